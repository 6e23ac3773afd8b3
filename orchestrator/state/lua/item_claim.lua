-- Claim one item of a map step for one attempt: the only way an item starts running (claim.lua's rules, per item).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id, index,
-- lease_s, n_parents, parents...
-- Returns {"ok", attempt, now, attempt_base, item_json, inputs, count, queued_at, step_task, key, p1_status,
-- p1_output, ...} | {"done", item_status} | {"inactive", why} | {"stale"} | {"superseded"} | {"busy", "own" or ""}
-- | {"missing"}.
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task, index, lease_s = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local n_parents = tonumber(ARGV[6])
local p = 's:' .. step .. ':'
local f = index .. ':'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status', 'inputs', 'deadline', 'seq', p .. 'items_total',
  p .. 'task')
if not head[1] then return {'missing'} end
if head[2] ~= gen then return {'stale'} end
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'attempts', f .. 'base', f .. 'item',
  f .. 'queued_at', f .. 'started_at', f .. 'key')
local status = row[1]
if not status then return {'missing'} end
if ITEM_ENDED[status] then return {'done', status} end
if head[1] ~= 'running' then return {'inactive', head[1]} end
if head[5] and head[5] ~= '' and now > tonumber(head[5]) then return {'inactive', 'deadline'} end
if head[3] ~= 'running' then return {'inactive', 'step ' .. (head[3] or '')} end
-- Pending: not queued yet; waiting: parked for its child or a decision (a redelivered message must not restart it).
if status == 'pending' or status == 'waiting' then return {'busy'} end
if status == 'queued' and row[2] and row[2] ~= '' and row[2] ~= task then return {'superseded'} end
if status == 'running' then return {'busy', row[2] == task and 'own' or ''} end

local attempts = (tonumber(row[3]) or 0) + 1
local stamp = string.format('%.6f', now)
local set = {f .. 'status', 'running', f .. 'task', task, f .. 'lease', string.format('%.6f', now + lease_s),
  f .. 'attempts', attempts}
if not row[7] then set[#set + 1] = f .. 'started_at' set[#set + 1] = stamp end
redis.call('HSET', items, unpack(set))
count_move(run, p, 'queued', 'running')
events_from(head[6])
emit(run, events, stamp, 'item_started', step, attempts, '{"index":' .. index .. '}')
emitted(run)
local out = {'ok', attempts, stamp, row[4] or '0', row[5] or 'null', head[4] or '{}', head[7] or '0', row[6] or '',
  head[8] or '', row[8] or ''}
if n_parents > 0 then
  local want = {}
  for i = 1, n_parents do
    local q = 's:' .. ARGV[6 + i] .. ':'
    want[#want + 1] = q .. 'status'
    want[#want + 1] = q .. 'output'
  end
  local rows = redis.call('HMGET', run, unpack(want))
  for i = 1, #rows do out[#out + 1] = rows[i] or '' end
end
return out
