-- Put a running step back in the queue after a retryable error, recording the error of that attempt.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, error_json, countdown_s, grace_s.
-- The step keeps a lease of countdown + grace: if the worker holding the delayed message dies, the sweeper sends it
-- again. Returns the lease (epoch seconds) when recorded, false when the attempt is stale (the run moved on).
local run, events = KEYS[1], KEYS[2]
local step, gen, task, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local countdown, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'errors', p .. 'attempts')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return false end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local lease = string.format('%.6f', clock + countdown + grace)
local errors = cjson.decode(head[4] ~= false and head[4] ~= '' and head[4] or '[]')
errors[#errors + 1] = cjson.decode(err)
redis.call('HSET', run, p .. 'status', 'queued', p .. 'lease', lease, p .. 'queued_at', now, p .. 'error', err,
  p .. 'errors', cjson.encode(errors))
local attempt = tonumber(head[5]) or 0
-- Joined as text, not re-encoded: cjson would round numbers and turn empty lists into objects.
emit(run, events, now, 'step_retry', step, attempt, '{"error":' .. err .. ',"countdown_s":' .. ARGV[5] .. '}')
emitted(run)
return lease
