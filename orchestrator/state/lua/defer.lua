-- Put a running step back in the queue without counting the attempt: it must wait for a shared LLM rate limit or a
-- provider's cool-down, and no worker slot may be held meanwhile.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, countdown_s, grace_s, detail_json.
-- As after a retry, the step keeps a lease of countdown + grace so a delayed message lost with its worker is sent
-- again. Returns the lease (epoch seconds) when recorded, false when the attempt is stale.
local run, events = KEYS[1], KEYS[2]
local step, gen, task = ARGV[1], ARGV[2], ARGV[3]
local countdown, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'attempts', p .. 'deferrals')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return false end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local lease = string.format('%.6f', clock + countdown + grace)
local attempts = (tonumber(head[4]) or 1) - 1
redis.call('HSET', run, p .. 'status', 'queued', p .. 'lease', lease, p .. 'queued_at', now, p .. 'attempts', attempts,
  p .. 'deferred_until', string.format('%.6f', clock + countdown), p .. 'deferral', ARGV[6],
  p .. 'deferrals', (tonumber(head[5]) or 0) + 1)
local attempt = attempts + 1
-- The detail is joined as text (see retry.lua).
emit(run, events, now, 'step_deferred', step, attempt,
  '{"deferral":' .. ARGV[6] .. ',"countdown_s":' .. ARGV[4] .. '}')
emitted(run)
return lease
