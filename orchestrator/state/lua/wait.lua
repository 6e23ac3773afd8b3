-- An approval step reached: hand the step over to a human. It holds no worker slot and no task while it waits.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, event_data_json, timeout_s ('' none).
-- Returns {"ok", decide_by_or_empty} or {"stale"}.
local run, events = KEYS[1], KEYS[2]
local step, gen, task, data, timeout = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', 'seq')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return {'stale'} end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local decide_by = ''
if timeout ~= '' then decide_by = string.format('%.6f', clock + tonumber(timeout)) end
events_from(head[4])
emit(run, events, now, 'step_waiting', step, 0, data)
redis.call('HSET', run, p .. 'status', 'waiting', p .. 'task', '', p .. 'lease', '', p .. 'waiting_since', now,
  p .. 'decide_by', decide_by, 'seq', _seq)
return {'ok', decide_by}
