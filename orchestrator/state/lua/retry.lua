-- Put a running step back in the queue after a retryable error, recording the error of that attempt.
-- KEYS[1] run hash. ARGV: step, generation, task_id, error_json.
-- Returns 1 when recorded, 0 when the attempt is stale (the run moved on).
local run = KEYS[1]
local step, gen, task, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'errors')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return 0 end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
local errors = cjson.decode(head[4] ~= false and head[4] ~= '' and head[4] or '[]')
errors[#errors + 1] = cjson.decode(err)
redis.call('HSET', run, p .. 'status', 'queued', p .. 'lease', '', p .. 'queued_at', now, p .. 'error', err,
  p .. 'errors', cjson.encode(errors))
return 1
