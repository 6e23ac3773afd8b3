-- Record a step's final outcome, release its children, and close the run when nothing is left.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the run's LLM reply cache (dropped when the run succeeds: no
-- step will ask again; a failed run keeps it, so a resume pays for no reply twice). ARGV: step, generation, task_id, outcome, output_json ('' keeps the stored output: a cache hit),
-- error_json, retention_s, cache_key, cached ('1' or ''), success_detail_json ('' for none), failure (the one-line
-- summary of a 'failed' outcome, else ''), children...
-- A failed run's "run_failed" event carries {"error": the first failure's summary, "failed_steps": [...]}.
-- Returns {"stale"} or {"ok", run_status_or_empty, released_child...}.
local run, events = KEYS[1], KEYS[2]
local step, gen, task, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local output, err, retention, cache_key, cached = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'errors', p .. 'attempts', 'seq')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return {'stale'} end
events_from(head[6])

local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
local fields = {p .. 'status', outcome, p .. 'finished_at', now, p .. 'lease', '', p .. 'cache_key', cache_key,
  p .. 'cached', cached, p .. 'force', ''}
if outcome ~= 'succeeded' then
  -- Only a success is a result to reuse; anything else must not be served from the cache on resume.
  fields[#fields + 1] = p .. 'output'
  fields[#fields + 1] = output
end
if outcome == 'succeeded' and output ~= '' then
  fields[#fields + 1] = p .. 'output'
  fields[#fields + 1] = output
end
if err ~= '' then
  local errors = cjson.decode(head[4] ~= false and head[4] ~= '' and head[4] or '[]')
  errors[#errors + 1] = cjson.decode(err)
  fields[#fields + 1] = p .. 'error'
  fields[#fields + 1] = err
  fields[#fields + 1] = p .. 'errors'
  fields[#fields + 1] = cjson.encode(errors)
end
redis.call('HSET', run, unpack(fields))
local attempt = tonumber(head[5]) or 0
local detail = err
if outcome == 'succeeded' then
  if cached == '1' then detail = '{"cached":true}' elseif ARGV[10] ~= '' then detail = ARGV[10] end
end
emit(run, events, now, 'step_' .. outcome, step, attempt, detail)
if outcome == 'failed' or outcome == 'upstream_failed' then
  redis.call('HINCRBY', run, 'failures', 1)
  if outcome == 'failed' then
    redis.call('HSETNX', run, 'first_failure', step)
    redis.call('HSETNX', run, 'failure', ARGV[11])
    local failed = cjson.decode(redis.call('HGET', run, 'failed_steps') or '[]')
    failed[#failed + 1] = step
    redis.call('HSET', run, 'failed_steps', cjson.encode(failed))
  end
end

local out = {'ok', ''}
for i = 12, #ARGV do
  local c = 's:' .. ARGV[i] .. ':'
  if redis.call('HINCRBY', run, c .. 'pending', -1) == 0 then
    redis.call('HSET', run, c .. 'status', 'queued', c .. 'queued_at', now)
    emit(run, events, now, 'step_queued', ARGV[i], 0, '')
    out[#out + 1] = ARGV[i]
  end
end

if redis.call('HINCRBY', run, 'remaining', -1) == 0 then
  local failures = tonumber(redis.call('HGET', run, 'failures') or '0')
  local status = failures > 0 and 'failed' or 'succeeded'
  redis.call('HSET', run, 'status', status, 'finished_at', now)
  local data = ''
  if status == 'failed' then
    local why = redis.call('HMGET', run, 'failure', 'failed_steps')
    -- Built by hand: cjson would encode an empty list as an object.
    data = '{"error":' .. cjson.encode(why[1] or 'run failed') .. ',"failed_steps":' .. (why[2] or '[]') .. '}'
  end
  emit(run, events, now, 'run_' .. status, '', 0, data)
  redis.call('EXPIRE', run, retention)
  redis.call('EXPIRE', events, retention)
  if status == 'succeeded' then redis.call('DEL', KEYS[3]) end
  out[2] = status
end
emitted(run)
return out
