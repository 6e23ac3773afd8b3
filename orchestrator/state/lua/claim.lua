-- Claim a step for one attempt: the only way a step starts running.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, lease_s, n_parents, parents..., n_children,
-- children..., carrier (optional: the task id of the message whose worker slot runs this step, when it continues
-- locally after its parent; a cancel revokes it too, so a prefork worker interrupts the step).
-- Returns {outcome, ...}:
--   {"ok", attempt, now, errors, inputs, attempt_base, cache_key, force, queued_at, p1_status, p1_output, ...}  run it
-- Attempts are numbered over the run's whole life (a resume does not start over: status, events and error records
-- all show this one number); attempt_base, the count when the generation began, gives the retry policy its own.
--   {"inactive", run_status or "deadline"} | {"stale"} | {"superseded"} | {"busy", "own" or ""} | {"missing"}
--   {"done", step_status, c1_status, c1_task, ...}   a duplicate delivery of a finished step
local run, events = KEYS[1], KEYS[2]
local step, gen, task, lease_s = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local n_parents = tonumber(ARGV[5])
local n_children = tonumber(ARGV[6 + n_parents])
local p = 's:' .. step .. ':'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6

-- One HMGET reads the run, the step and the parents' status and output (fields 17 onwards).
local want = {'status', 'gen', p .. 'status', p .. 'task', p .. 'lease', p .. 'attempts', p .. 'errors', 'inputs',
  p .. 'attempt_base', p .. 'cache_key', p .. 'force', 'deadline', 'seq', p .. 'queued_at', 'created_at', p .. 'carrier'}
for i = 1, n_parents do
  local q = 's:' .. ARGV[5 + i] .. ':'
  want[#want + 1] = q .. 'status'
  want[#want + 1] = q .. 'output'
end
local head = redis.call('HMGET', run, unpack(want))
local run_status, run_gen, status, owner, lease, attempts = head[1], head[2], head[3], head[4], head[5], head[6]
if not run_status or not status then return {'missing'} end
if run_gen ~= gen then return {'stale'} end

if status ~= 'queued' and status ~= 'running' and status ~= 'pending' then
  local out = {'done', status}
  for i = 1, n_children do
    local c = 's:' .. ARGV[6 + n_parents + i] .. ':'
    local row = redis.call('HMGET', run, c .. 'status', c .. 'task')
    out[#out + 1] = row[1] or ''
    out[#out + 1] = row[2] or ''
  end
  return out
end
if run_status ~= 'running' then return {'inactive', run_status} end
-- Past the workflow deadline nothing new starts, even before a sweeper gets to time the run out.
if head[12] and head[12] ~= '' and now > tonumber(head[12]) then return {'inactive', 'deadline'} end
if status == 'pending' then return {'busy'} end
if status == 'queued' and owner and owner ~= '' and owner ~= task then return {'superseded'} end
-- A running step is never started twice: the sweeper re-queues it once its lease has expired. A second copy of the
-- running attempt's own message says so, so that the caller leaves the attempt's lease entry in place.
if status == 'running' then return {'busy', owner == task and 'own' or ''} end

attempts = (tonumber(attempts) or 0) + 1
local fields = {p .. 'status', 'running', p .. 'task', task, p .. 'lease', string.format('%.6f', now + lease_s),
  p .. 'attempts', attempts, p .. 'attempt_started_at', string.format('%.6f', now)}
local carrier = ARGV[7 + n_parents + n_children] or ''
if carrier ~= '' or head[16] then
  fields[#fields + 1] = p .. 'carrier'
  fields[#fields + 1] = carrier
end
if attempts == 1 or not redis.call('HGET', run, p .. 'started_at') then
  fields[#fields + 1] = p .. 'started_at'
  fields[#fields + 1] = string.format('%.6f', now)
end
events_from(head[13])
emit(run, events, string.format('%.6f', now), 'step_started', step, attempts, '')
fields[#fields + 1] = 'seq'
fields[#fields + 1] = _seq
redis.call('HSET', run, unpack(fields))

local out = {'ok', attempts, string.format('%.6f', now), head[7] or '', head[8] or '{}', head[9] or '0',
  head[10] or '', head[11] or '', head[14] or head[15] or ''}
for i = 17, 16 + 2 * n_parents do out[#out + 1] = head[i] or '' end
return out
