-- Extend the leases of items still running on this worker (renew.lua's rule, per item).
-- KEYS[1] run hash, KEYS[2] its event stream (unused), KEYS[3] the step's item hash. ARGV: lease_s, then index,
-- task_id pairs. Returns {now, renewed_flag...}.
local run, items = KEYS[1], KEYS[3]
local lease_s = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {string.format('%.6f', now)}
local status = redis.call('HGET', run, 'status')
for i = 2, #ARGV, 2 do
  local f = ARGV[i] .. ':'
  local row = redis.call('HMGET', items, f .. 'status', f .. 'task')
  if status == 'running' and row[1] == 'running' and row[2] == ARGV[i + 1] then
    redis.call('HSET', items, f .. 'lease', string.format('%.6f', now + lease_s))
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
