-- A child run ended: count its LLM spend into the parent run, and take the parent's waiting step over so the caller
-- can finish it (finish.lua) under its own task id, as a decision does (decide.lua).
-- KEYS[1] the parent's run hash. ARGV: step, generation, child_run_id, task_id, lease_s, then the child's totals:
--   spent_nusd, calls, input_tokens, output_tokens.
-- The spend counts once per child however often it ends (a resumed child ends again): only what it added since it
-- was last counted, and only while it is the step's child. The step is taken over only in the generation that
-- started the child (a later resume or cancel fences it off) and only while it waits.
-- Returns {"ok"} | {"not_waiting", step_status} | {"stale", generation} | {"missing"}.
local run = KEYS[1]
local step, gen, child, token, lease_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status', p .. 'child_run_id', p .. 'child_counted')
if not head[1] or not head[3] then return {'missing'} end
if head[4] ~= child then return {'not_waiting', head[3]} end
local counted = {0, 0, 0, 0}
if head[5] and head[5] ~= '' then
  local i = 1
  for n in string.gmatch(head[5], '[^,]+') do counted[i] = tonumber(n) i = i + 1 end
end
local names = {'llm_spent_nusd', 'llm_calls', 'llm_input_tokens', 'llm_output_tokens'}
local now_counted = {}
for i = 1, 4 do
  local total = tonumber(ARGV[5 + i]) or 0
  if total > counted[i] then redis.call('HINCRBY', run, names[i], total - counted[i]) end
  now_counted[i] = tostring(math.max(total, counted[i]))
end
redis.call('HSET', run, p .. 'child_counted', table.concat(now_counted, ','))
if head[2] ~= gen then return {'stale', head[2]} end
if head[1] ~= 'running' or head[3] ~= 'waiting' then return {'not_waiting', head[3]} end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', run, p .. 'status', 'running', p .. 'task', token, p .. 'lease',
  string.format('%.6f', clock + lease_s))
return {'ok'}
