-- An item of a workflow map step started (or found) its child run: park the item as "waiting" for it, holding no
-- worker slot, no task and no lease (the sweeper leaves it alone), and record the child's id on the item. It still
-- counts against max_parallel. The child's end completes the item (item_child_done.lua, then item_finish.lua).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id, index,
-- child_run_id.
-- Returns {"ok"} or {"stale"}.
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task, index, child = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', 'seq')
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'attempts', f .. 'child_run_id')
if head[1] ~= gen or head[2] ~= 'running' or row[1] ~= 'running' or row[2] ~= task then return {'stale'} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('HSET', items, f .. 'status', 'waiting', f .. 'task', '', f .. 'lease', '', f .. 'child_run_id', child)
-- Another child (a later generation's): its spend is counted from nothing.
if row[4] ~= child then redis.call('HSET', items, f .. 'child_counted', '') end
count_move(run, p, 'running', 'waiting')
events_from(head[3])
emit(run, events, now, 'item_waiting', step, tonumber(row[3]) or 0,
  cjson.encode({index = tonumber(index), child_run_id = child}))
emitted(run)
return {'ok'}
