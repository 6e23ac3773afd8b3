-- Extend the leases of attempts still running on this worker.
-- KEYS[1] run hash. ARGV: lease_s, then step, task_id pairs.
-- Returns {now, renewed_flag...} with 1 where the lease was extended, 0 where the attempt is no longer ours.
local run = KEYS[1]
local lease_s = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {string.format('%.6f', now)}
local status = redis.call('HGET', run, 'status')
for i = 2, #ARGV, 2 do
  local p = 's:' .. ARGV[i] .. ':'
  local row = redis.call('HMGET', run, p .. 'status', p .. 'task')
  if status == 'running' and row[1] == 'running' and row[2] == ARGV[i + 1] then
    redis.call('HSET', run, p .. 'lease', string.format('%.6f', now + lease_s))
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
