-- The child run of a workflow map step's item ended: count its LLM spend into the parent run (once: only what it
-- added since it was last counted), and take the waiting item over so the caller can finish it (item_finish.lua)
-- under its own task id. The item is taken over only in the generation that started the child, while its step runs
-- and the item waits for this child.
-- KEYS[1] the parent's run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation,
-- index, child_run_id, task_id, lease_s, then the child's totals: spent_nusd, calls, input_tokens, output_tokens.
-- Returns {"ok", lease} | {"not_waiting", item_status} | {"stale", generation} | {"missing"}.
local run, items = KEYS[1], KEYS[3]
local step, gen, index, child, token, lease_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status')
local row = redis.call('HMGET', items, f .. 'status', f .. 'child_run_id', f .. 'child_counted')
if not head[1] or not row[1] then return {'missing'} end
if row[2] ~= child then return {'not_waiting', row[1]} end
local counted = {0, 0, 0, 0}
if row[3] and row[3] ~= '' then
  local i = 1
  for n in string.gmatch(row[3], '[^,]+') do counted[i] = tonumber(n) i = i + 1 end
end
local names = {'llm_spent_nusd', 'llm_calls', 'llm_input_tokens', 'llm_output_tokens'}
local now_counted = {}
for i = 1, 4 do
  local total = tonumber(ARGV[6 + i]) or 0
  if total > counted[i] then redis.call('HINCRBY', run, names[i], total - counted[i]) end
  now_counted[i] = tostring(math.max(total, counted[i]))
end
redis.call('HSET', items, f .. 'child_counted', table.concat(now_counted, ','))
if head[2] ~= gen then return {'stale', head[2]} end
if head[1] ~= 'running' or head[3] ~= 'running' or row[1] ~= 'waiting' then return {'not_waiting', row[1]} end
local t = redis.call('TIME')
local lease = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + lease_s)
redis.call('HSET', items, f .. 'status', 'running', f .. 'task', token, f .. 'lease', lease)
count_move(run, p, 'waiting', 'running')
return {'ok', lease}
