-- Re-queue a step whose attempt lost its worker (lease expired), under a new task id.
-- KEYS[1] run hash. ARGV: step, expected_task, new_task, error_json.
-- Returns {"ok", def_hash, generation} or {"skip"} when the attempt is alive, finished or already re-queued.
local run = KEYS[1]
local step, expected, new_task, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', p .. 'status', p .. 'task', p .. 'lease', p .. 'errors', 'def_hash',
  'gen')
if head[1] ~= 'running' or head[2] ~= 'running' or head[3] ~= expected then return {'skip'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if tonumber(head[4] or '0') and tonumber(head[4] or '0') > now then return {'skip'} end
local errors = cjson.decode(head[5] ~= false and head[5] ~= '' and head[5] or '[]')
errors[#errors + 1] = cjson.decode(err)
redis.call('HSET', run, p .. 'status', 'queued', p .. 'task', new_task, p .. 'lease', '',
  p .. 'queued_at', string.format('%.6f', now), p .. 'error', err, p .. 'errors', cjson.encode(errors))
return {'ok', head[6], head[7]}
