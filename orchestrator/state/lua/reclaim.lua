-- Recover a step whose message was lost: its lease (or its dispatch hold) ran out.
--   running: the worker died mid-attempt. Re-queue it under a new task id (the lost message, should the broker ever
--            redeliver it, is then superseded) and record the loss as the attempt's error.
--   queued:  a delayed retry or an earlier re-dispatch was lost with its worker. Send it again under the same task id
--            (whichever copy arrives first runs; the other finds it taken), so a backlog cannot supersede itself.
--            A step released but never claimed has no task yet: the expired entry is its dispatch hold, whose task id
--            the lost message carried.
--   unclaimed, while the step queues hold a backlog (backlog_wait_s > 0): the message is likely still waiting in it,
--            so the hold is extended by grace_s instead, until the step has waited backlog_wait_s since it was queued.
--   running, owner_dead ('1'): the process that ran it stopped beating (a dead owner, see engine/leases.py): its lease
--            is not waited for, the attempt is re-queued at once.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, expected_task, new_task, error_json, grace_s,
-- backlog_wait_s, owner_dead.
-- Returns {"ok", def_hash, generation, task_id, lease} to publish; {"live", lease} while the lease holds;
-- {"skip"} when the attempt is finished, stale or not the expected one.
local MAX_BACKOFF = 8
local run, events = KEYS[1], KEYS[2]
local step, expected, new_task, err, grace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local backlog_wait = tonumber(ARGV[6] or '0')
local owner_dead = ARGV[7] == '1'
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', p .. 'status', p .. 'task', p .. 'lease', p .. 'errors', 'def_hash',
  'gen', p .. 'queued_at', 'created_at')
local status = head[2]
local unclaimed = status == 'queued' and (not head[3] or head[3] == '')
if head[1] ~= 'running' or (head[3] ~= expected and not unclaimed) or (status ~= 'running' and status ~= 'queued') then
  return {'skip'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(head[4] or '')
if lease and lease > now and not (owner_dead and status == 'running') then return {'live', head[4]} end
-- A map step expanded in this generation runs as its items: its own lease only watches for a lost finish. While
-- items are unfinished it is extended; once all have ended, it is re-queued below and its next attempt finishes it.
if status == 'running' then
  local m = redis.call('HMGET', run, p .. 'map_gen', p .. 'items_total', p .. 'items_succeeded', p .. 'items_failed',
    p .. 'items_skipped', p .. 'items_cancelled')
  if m[1] and m[1] == head[7] then
    local ended = 0
    for i = 3, 6 do ended = ended + (tonumber(m[i] or '0') or 0) end
    if ended < (tonumber(m[2]) or 0) then
      local held = string.format('%.6f', now + grace)
      redis.call('HSET', run, p .. 'lease', held)
      return {'live', held}
    end
  end
end
if unclaimed and backlog_wait > 0 and now - tonumber(head[8] or head[9] or now) < backlog_wait then
  local held = string.format('%.6f', now + grace)
  redis.call('HSET', run, p .. 'lease', held)
  return {'live', held}
end
local until_ = string.format('%.6f', now + grace)
local stamp = string.format('%.6f', now)
if status == 'queued' then
  -- Each time a step still waiting is sent again its next grace doubles (up to 8 times): a step stuck behind a backlog
  -- longer than the grace is resent a few times, not once per grace period.
  local resends = redis.call('HINCRBY', run, p .. 'resends', 1)
  until_ = string.format('%.6f', now + grace * math.min(2 ^ (resends - 1), MAX_BACKOFF))
  redis.call('HSET', run, p .. 'lease', until_)
  emit(run, events, stamp, 'step_queued', step, 0, cjson.encode({resent = true}))
  emitted(run)
  return {'ok', head[6], head[7], expected, until_}
end
local errors = cjson.decode(head[5] ~= false and head[5] ~= '' and head[5] or '[]')
errors[#errors + 1] = cjson.decode(err)
redis.call('HSET', run, p .. 'status', 'queued', p .. 'task', new_task, p .. 'lease', until_,
  p .. 'queued_at', stamp, p .. 'error', err, p .. 'errors', cjson.encode(errors))
emit(run, events, stamp, 'step_lost', step, 0, err)
emit(run, events, stamp, 'step_queued', step, 0, '')
emitted(run)
return {'ok', head[6], head[7], new_task, until_}
