-- Put a running item back in the queue: after a retryable error (counted), or deferred for a shared rate limit
-- (not counted: its attempt number is given back).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id, index,
-- error_json ('' when deferred), countdown_s, grace_s, counted ('1' or '').
-- The item keeps its task id (Celery's retry message carries it) and a lease of countdown + grace, so a delayed
-- retry lost with its worker is sent again by the sweeper. Returns the lease, or false when the attempt is stale.
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task, index, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local countdown, grace, counted = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'gen', 'seq')
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'attempts')
if head[1] ~= gen or row[1] ~= 'running' or row[2] ~= task then return false end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local lease = string.format('%.6f', clock + countdown + grace)
local attempts = tonumber(row[3]) or 0
if not counted then attempts = attempts - 1 end
redis.call('HSET', items, f .. 'status', 'queued', f .. 'lease', lease, f .. 'queued_at', now, f .. 'attempts', attempts)
if err ~= '' then redis.call('HSET', items, f .. 'error', err) end
count_move(run, p, 'running', 'queued')
events_from(head[2])
local kind = counted and 'item_retry' or 'item_deferred'
local detail = '{"index":' .. index .. ',"countdown_s":' .. ARGV[6] .. (err ~= '' and (',"error":' .. err) or '') .. '}'
emit(run, events, now, kind, step, tonumber(row[3]) or 0, detail)
emitted(run)
return lease
