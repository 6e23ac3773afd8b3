-- Park a running item as "waiting", holding no worker slot, no task and no lease (the sweeper leaves it alone); it
-- still counts against max_parallel. Two waits: an item of a workflow map step that started (or found) its child
-- run records the child's id, and the child's end completes it (item_child_done.lua, then item_finish.lua); an item
-- of an approval map step waits for a human decision on it (item_decide.lua), until decide_by when it has a timeout.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id, index,
-- child_run_id ('' for a decision), event_data_json ('' for the child's), timeout_s ('' for none).
-- Returns {"ok", decide_by_or_empty} or {"stale"}.
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task, index, child = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local data, timeout = ARGV[6] or '', ARGV[7] or ''
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', 'seq')
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'attempts', f .. 'child_run_id')
if head[1] ~= gen or head[2] ~= 'running' or row[1] ~= 'running' or row[2] ~= task then return {'stale'} end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
redis.call('HSET', items, f .. 'status', 'waiting', f .. 'task', '', f .. 'lease', '')
local decide_by = ''
if child ~= '' then
  redis.call('HSET', items, f .. 'child_run_id', child)
  -- Another child (a later generation's): its spend is counted from nothing.
  if row[4] ~= child then redis.call('HSET', items, f .. 'child_counted', '') end
  data = cjson.encode({index = tonumber(index), child_run_id = child})
else
  if timeout ~= '' then decide_by = string.format('%.6f', clock + tonumber(timeout)) end
  redis.call('HSET', items, f .. 'decide_by', decide_by)
end
count_move(run, p, 'running', 'waiting')
events_from(head[3])
emit(run, events, now, 'item_waiting', step, tonumber(row[3]) or 0, data)
emitted(run)
return {'ok', decide_by}
