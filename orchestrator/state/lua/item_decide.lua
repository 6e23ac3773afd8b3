-- A human decision on one waiting item of an approval map step (decide.lua's rules, per item): the first allowed
-- decision wins; every attempt, allowed or refused, is appended to the item's own audit trail while the run lasts
-- (the newest max_audit entries, an accepted one never pushed out by refusals). A won decision makes the item
-- "running" under the decision's task id, to be finished right after like any item (item_finish.lua).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, index, decision, who,
-- comment, allowed ('1' or '0'), decision_task_id, lease_s, generation ('' for any), max_audit.
-- Returns {"ok", generation, decided_at} | {"forbidden"} | {"not_waiting", item_status} | {"stale", generation} |
--   {"missing"}.
local run, items = KEYS[1], KEYS[3]
local step, index, decision, who, comment, allowed = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local token, lease_s, expected, max_audit = ARGV[7], tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'status', p .. 'map_gen')
if not head[1] or not head[3] then return {'missing'} end
if expected ~= '' and head[2] ~= expected then return {'stale', head[2]} end
local row = redis.call('HMGET', items, f .. 'status', f .. 'audit', f .. 'child_run_id')
local status = row[1]
if head[4] ~= head[2] or not status then status = 'pending' end
local clock, now = decision_clock()
local outcome = 'accepted'
local waiting = status == 'waiting' and not (row[3] and row[3] ~= '')
if allowed ~= '1' then
  outcome = 'refused: not an approver'
elseif head[1] ~= 'running' or head[3] ~= 'running' or not waiting then
  outcome = 'refused: not waiting (' .. (waiting and head[1] or status) .. ')'
end
if run_live(head[1]) and row[1] then
  audit_decision(items, f .. 'audit', row[2], max_audit,
    {at = now, by = who, decision = decision, comment = comment, outcome = outcome})
end
if allowed ~= '1' then return {'forbidden'} end
if outcome ~= 'accepted' then return {'not_waiting', waiting and head[1] or status} end
redis.call('HSET', items, f .. 'status', 'running', f .. 'task', token, f .. 'lease',
  string.format('%.6f', clock + lease_s), f .. 'decide_by', '')
count_move(run, p, 'waiting', 'running')
return {'ok', head[2], now}
