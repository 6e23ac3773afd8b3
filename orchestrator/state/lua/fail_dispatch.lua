-- Fail a run whose first tasks could not be published (the broker did not answer), with the run's final event in
-- the same step: a client following its events sees it end instead of waiting for ever.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] its large values once ended (_ended.lua). ARGV: message,
-- retention_s.
-- Returns {"ok", generation}, {"finished", status} when the run had ended already, or {"missing"}.
local run, events = KEYS[1], KEYS[2]
local message, retention = ARGV[1], tonumber(ARGV[2])
local head = redis.call('HMGET', run, 'status', 'gen', 'seq')
if not head[1] then return {'missing'} end
if head[1] ~= 'running' and head[1] ~= 'waiting' and head[1] ~= 'pending' then return {'finished', head[1]} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
events_from(head[3])
emit(run, events, now, 'run_failed', '', 0, '{"reason":' .. cjson.encode(message) .. ',"error":' .. cjson.encode(message) .. ',"failed_steps":[]}')
redis.call('HSET', run, 'status', 'failed', 'finished_at', now, 'error', message, 'first_failure', '(dispatch)',
  'seq', _seq)
ended(run, events, retention)
return {'ok', head[2]}
