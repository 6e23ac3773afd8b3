-- A human decision on a waiting approval step. The first allowed decision wins; every attempt, allowed or refused,
-- is appended to the step's audit trail. A won decision makes the step "running" under the decision's own task id,
-- to be finished right after like any attempt (finish.lua releases its dependents).
-- KEYS[1] run hash, KEYS[2] its event stream.
-- ARGV: step, decision, who, comment, allowed ('1' or '0'), decision_task_id, lease_s.
-- Returns {"ok", generation, decided_at} | {"forbidden"} | {"not_waiting", step_status} | {"missing"}.
local run = KEYS[1]
local step, decision, who, comment, allowed, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local lease_s = tonumber(ARGV[7])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status', p .. 'audit')
if not head[1] or not head[3] then return {'missing'} end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local outcome = 'accepted'
if allowed ~= '1' then
  outcome = 'refused: not an approver'
elseif head[1] ~= 'running' or head[3] ~= 'waiting' then
  outcome = 'refused: not waiting (' .. (head[3] == 'waiting' and head[1] or head[3]) .. ')'
end
local audit = cjson.decode(head[4] ~= false and head[4] ~= '' and head[4] or '[]')
audit[#audit + 1] = {at = now, by = who, decision = decision, comment = comment, outcome = outcome}
redis.call('HSET', run, p .. 'audit', cjson.encode(audit))
if allowed ~= '1' then return {'forbidden'} end
if outcome ~= 'accepted' then return {'not_waiting', head[3]} end
redis.call('HSET', run, p .. 'status', 'running', p .. 'task', token, p .. 'lease',
  string.format('%.6f', clock + lease_s), p .. 'decision',
  cjson.encode({decision = decision, by = who, comment = comment, at = now}), p .. 'decide_by', '')
return {'ok', head[2], now}
