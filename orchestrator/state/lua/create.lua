-- Create a run with all its steps in one step; refuses to overwrite an existing run.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: ttl_s, then field, value pairs.
-- Returns the creation time, or false if it exists.
local run, events = KEYS[1], KEYS[2]
if redis.call('EXISTS', run) == 1 then return false end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
local fields = {'created_at', now, 'started_at', now}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', run, unpack(fields))
local timeout = redis.call('HGET', run, 'timeout_s')
if timeout and timeout ~= '' then
  redis.call('HSET', run, 'deadline', string.format('%.6f', tonumber(now) + tonumber(timeout)))
end
emit(run, events, now, 'run_started', '', 0, '')
for i = 2, #ARGV, 2 do
  local step = string.match(ARGV[i], '^s:(.+):status$')
  if step and ARGV[i + 1] == 'queued' then emit(run, events, now, 'step_queued', step, 0, '') end
end
emitted(run)
redis.call('EXPIRE', run, tonumber(ARGV[1]))
redis.call('EXPIRE', events, tonumber(ARGV[1]))
return now
