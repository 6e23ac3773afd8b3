-- Start a new generation of a finished run from its checkpoint. The caller computed which steps to reset from the
-- state it read at generation expected_gen; if another resume won meanwhile, the generation moved and this refuses.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] its large values (_ended.lua). ARGV: expected_gen,
--   allowed_statuses (comma-separated), active_ttl_s, forced_step ('' none), new definition hash ('' keeps it), then
--   step, status, pending triples to reset.
-- Returns {"ok", new_generation, deadline_or_empty}, {"conflict", generation} or {"refused", run_status}.
local run, events = KEYS[1], KEYS[2]
local expected, allowed, ttl, forced, definition = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local head = redis.call('HMGET', run, 'status', 'gen')
if not head[1] then return {'refused', 'missing'} end
if head[2] ~= expected then return {'conflict', head[2]} end
if not string.find(',' .. allowed .. ',', ',' .. head[1] .. ',', 1, true) then return {'refused', head[1]} end
-- An ended run keeps its long values beside its hash (_ended.lua): back into the hash before anything reads them.
ended_unpack(run)
local gen = tostring(tonumber(expected) + 1)
local t0 = redis.call('TIME')
local stamp = string.format('%.6f', tonumber(t0[1]) + tonumber(t0[2]) / 1e6)
emit(run, events, stamp, 'run_resumed', '', 0, cjson.encode({generation = tonumber(gen)}))
local count = 0
for i = 6, #ARGV, 3 do
  local p = 's:' .. ARGV[i] .. ':'
  local attempts = redis.call('HGET', run, p .. 'attempts') or '0'
  redis.call('HSET', run, p .. 'status', ARGV[i + 1], p .. 'pending', ARGV[i + 2], p .. 'task', '', p .. 'lease', '',
    p .. 'attempt_base', attempts, p .. 'force', ARGV[i] == forced and '1' or '')
  redis.call('HDEL', run, p .. 'finished_at', p .. 'error', p .. 'queued_at', p .. 'decision', p .. 'decide_by')
  if ARGV[i + 1] == 'queued' then emit(run, events, stamp, 'step_queued', ARGV[i], 0, '') end
  count = count + 1
end
redis.call('HSET', run, 'status', 'running', 'gen', gen, 'remaining', count, 'failures', 0, 'leaf_failures', 0)
if definition ~= '' then redis.call('HSET', run, 'def_hash', definition) end
redis.call('HDEL', run, 'finished_at', 'stopped_at', 'error', 'first_failure', 'failure', 'failed_steps', 'deadline')
local deadline = ''
local timeout = redis.call('HGET', run, 'timeout_s')
if timeout and timeout ~= '' then
  -- The workflow deadline runs again from the resume: the caller's new budget, not what was left of the old one.
  local t = redis.call('TIME')
  deadline = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(timeout))
  redis.call('HSET', run, 'deadline', deadline)
end
emitted(run)
redis.call('EXPIRE', run, ttl)
redis.call('EXPIRE', events, ttl)
return {'ok', gen, deadline}
