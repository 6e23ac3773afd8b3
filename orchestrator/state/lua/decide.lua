-- A human decision on a waiting approval step. The first allowed decision wins; every attempt, allowed or refused,
-- is appended to the step's audit trail while the run lasts. A won decision makes the step "running" under the
-- decision's own task id, to be finished right after like any attempt (finish.lua releases its dependents).
-- The trail is bounded: it keeps the newest max_audit entries, dropping the oldest refused one first (an accepted
-- decision is never pushed out by refusals), and once the run has ended a refused decision is not recorded at all.
-- KEYS[1] run hash, KEYS[2] its event stream.
-- ARGV: step, decision, who, comment, allowed ('1' or '0'), decision_task_id, lease_s, generation ('' for any:
--   a timeout names the generation it was set for, so it cannot decide the wait of a later one), max_audit.
-- Returns {"ok", generation, decided_at} | {"forbidden"} | {"not_waiting", step_status} | {"stale", generation} |
--   {"missing"}.
local run = KEYS[1]
local step, decision, who, comment, allowed, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local lease_s, expected, max_audit = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status', p .. 'audit')
if not head[1] or not head[3] then return {'missing'} end
if expected ~= '' and head[2] ~= expected then return {'stale', head[2]} end
local clock, now = decision_clock()
local outcome = 'accepted'
if allowed ~= '1' then
  outcome = 'refused: not an approver'
elseif head[1] ~= 'running' or head[3] ~= 'waiting' then
  outcome = 'refused: not waiting (' .. (head[3] == 'waiting' and head[1] or head[3]) .. ')'
end
if run_live(head[1]) then
  audit_decision(run, p .. 'audit', head[4], max_audit,
    {at = now, by = who, decision = decision, comment = comment, outcome = outcome})
end
if allowed ~= '1' then return {'forbidden'} end
if outcome ~= 'accepted' then return {'not_waiting', head[3]} end
redis.call('HSET', run, p .. 'status', 'running', p .. 'task', token, p .. 'lease',
  string.format('%.6f', clock + lease_s), p .. 'decision',
  cjson.encode({decision = decision, by = who, comment = comment, at = now}), p .. 'decide_by', '')
return {'ok', head[2], now}
