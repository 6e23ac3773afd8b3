-- Prepended to claim.lua and finish.lua: claim a step for one attempt, the only way a step starts running (claim.lua
-- tells the arguments and replies). finish.lua claims here the released child its worker slot keeps to run next
-- ("continuing locally"), in the same script: that hop then costs no round trip, TIME or HSET of its own.
-- now: Redis's clock (a number). parents, children: lists of step names. pending: run-hash fields the calling script
-- has decided but not written yet (finish.lua writes its fields in one HSET at its end), read in place of the hash's.
-- write: the list the claim appends its field writes to; the caller HSETs them with the run's "seq".
-- head: the claim's read (claim_reads), when the caller made it already (finish.lua, in its own first HMGET).

-- What a claim reads of the run hash, in one HMGET: the run, the step and the parents' status and output (fields 18
-- onwards).
local function claim_reads(step, parents)
  local p = 's:' .. step .. ':'
  local want = {'status', 'gen', p .. 'status', p .. 'task', p .. 'lease', p .. 'attempts', p .. 'errors', 'inputs',
    p .. 'attempt_base', p .. 'cache_key', p .. 'force', 'deadline', 'seq', p .. 'queued_at', 'created_at',
    p .. 'carrier', p .. 'started_at'}
  for _, parent in ipairs(parents) do
    local q = 's:' .. parent .. ':'
    want[#want + 1] = q .. 'status'
    want[#want + 1] = q .. 'output'
  end
  return want
end

local function claim_step(run, events, now, step, gen, task, lease_s, parents, children, carrier, pending, write, head)
  local p = 's:' .. step .. ':'
  local want = claim_reads(step, parents)
  head = head or redis.call('HMGET', run, unpack(want))
  for i, name in ipairs(want) do
    if pending[name] ~= nil then head[i] = pending[name] end
  end
  local run_status, run_gen, status, owner, attempts = head[1], head[2], head[3], head[4], head[6]
  if not run_status or not status then return {'missing'} end
  if run_gen ~= gen then return {'stale'} end

  if status ~= 'queued' and status ~= 'running' and status ~= 'pending' then
    local out = {'done', status}
    for _, child in ipairs(children) do
      local c = 's:' .. child .. ':'
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
  local stamp = string.format('%.6f', now)
  local fields = {p .. 'status', 'running', p .. 'task', task, p .. 'lease', string.format('%.6f', now + lease_s),
    p .. 'attempts', attempts, p .. 'attempt_started_at', stamp}
  if carrier ~= '' or head[16] then
    fields[#fields + 1] = p .. 'carrier'
    fields[#fields + 1] = carrier
  end
  if attempts == 1 or not head[17] then
    fields[#fields + 1] = p .. 'started_at'
    fields[#fields + 1] = stamp
  end
  for _, value in ipairs(fields) do write[#write + 1] = value end
  if not _seq then events_from(head[13]) end
  emit(run, events, stamp, 'step_started', step, attempts, '')

  local out = {'ok', attempts, stamp, head[7] or '', head[8] or '{}', head[9] or '0', head[10] or '', head[11] or '',
    head[14] or head[15] or ''}
  for i = 18, 17 + 2 * #parents do out[#out + 1] = head[i] or '' end
  return out
end
