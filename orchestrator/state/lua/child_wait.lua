-- A workflow step started (or found) its child run: park the step as "waiting" for it, holding no worker slot and
-- no task, and record the child's id on the step. The child's end completes the step (child_done.lua).
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, child_run_id.
-- Returns {"ok"} or {"stale"}.
local run, events = KEYS[1], KEYS[2]
local step, gen, task, child = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', 'seq', p .. 'child_run_id')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return {'stale'} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
events_from(head[4])
emit(run, events, now, 'step_waiting', step, 0, cjson.encode({child_run_id = child}))
local fields = {p .. 'status', 'waiting', p .. 'task', '', p .. 'lease', '', p .. 'waiting_since', now,
  p .. 'child_run_id', child, 'seq', _seq}
if head[5] ~= child then
  -- Another child (a re-run with --from): its spend is counted from nothing.
  fields[#fields + 1] = p .. 'child_counted'
  fields[#fields + 1] = ''
end
redis.call('HSET', run, unpack(fields))
return {'ok'}
