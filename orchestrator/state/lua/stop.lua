-- End a run early: cancelled by a user or timed out at its deadline. No step starts after this returns: every
-- claim checks the run's status. Finished steps keep their outputs; unfinished ones become "cancelled".
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] its large values once ended (_ended.lua).
-- ARGV: final_status, reason, retention_s, expected_generation ('' for any), steps...
-- Returns {"ok", stopped_at, generation, step, task_id, ...} for the steps that were running (to interrupt; a step
-- running locally after its parent is listed twice, the second time with its carrier's task id),
-- {"finished", status} when the run had already ended, {"stale"} for another generation, {"missing"}.
local run, events = KEYS[1], KEYS[2]
local final, reason, retention, gen = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local head = redis.call('HMGET', run, 'status', 'gen')
if not head[1] then return {'missing'} end
if gen ~= '' and head[2] ~= gen then return {'stale'} end
if head[1] ~= 'running' and head[1] ~= 'waiting' and head[1] ~= 'pending' then return {'finished', head[1]} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('HSET', run, 'status', final, 'finished_at', now, 'stopped_at', now, 'error', reason)
local out = {'ok', now, head[2]}
for i = 5, #ARGV do
  local p = 's:' .. ARGV[i] .. ':'
  local row = redis.call('HMGET', run, p .. 'status', p .. 'task', p .. 'carrier')
  local st = row[1]
  if st == 'pending' or st == 'queued' or st == 'running' or st == 'waiting' then
    redis.call('HSET', run, p .. 'status', 'cancelled', p .. 'finished_at', now, p .. 'lease', '')
    emit(run, events, now, 'step_cancelled', ARGV[i], 0, '')
    if st == 'running' or st == 'queued' then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = row[2] or ''
    end
    -- A step running in the slot of the message that ran its parent (see claim.lua) is interrupted through it.
    if st == 'running' and row[3] and row[3] ~= '' then
      out[#out + 1] = ARGV[i]
      out[#out + 1] = row[3]
    end
  end
end
emit(run, events, now, 'run_' .. final, '', 0, cjson.encode({reason = reason}))
emitted(run)
ended(run, events, retention)
return out
