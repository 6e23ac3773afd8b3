-- Journal one entry of an agent step (a turn, a tool call started or finished): the attempt that made it must still
-- own the step, as for finish. KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's journal hash.
-- ARGV: step, generation, task_id, entry id, entry_json, ttl_s, event type ('' for none), event data.
-- Returns 1 when recorded, 0 when the attempt is stale (another generation, not running, or another task id).
local run, events, journal = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task = ARGV[1], ARGV[2], ARGV[3]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'attempts', 'seq')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return 0 end
redis.call('HSET', journal, ARGV[4], ARGV[5])
redis.call('EXPIRE', journal, tonumber(ARGV[6]))
if ARGV[7] ~= '' then
  events_from(head[5])
  local t = redis.call('TIME')
  local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
  emit(run, events, now, ARGV[7], step, tonumber(head[4]) or 0, ARGV[8])
  emitted(run)
end
return 1
