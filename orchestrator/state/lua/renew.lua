-- Extend the leases of attempts still running on this worker.
-- KEYS[1] run hash. ARGV: the leases' new end (Redis's clock as the calling process reckons it, see
-- orchestrator/state/redis/clock.py: a backstop of minutes needs no TIME of its own), then step, task_id pairs.
-- Returns {renewed_flag...} with 1 where the lease was extended, 0 where the attempt is no longer ours.
local run = KEYS[1]
local lease_end = string.format('%.6f', tonumber(ARGV[1]))
local out = {}
for i = 2, #ARGV, 2 do
  local p = 's:' .. ARGV[i] .. ':'
  -- The run's status rides along with each step's: one read a step, none for the run.
  local row = redis.call('HMGET', run, p .. 'status', p .. 'task', 'status')
  if row[3] == 'running' and row[1] == 'running' and row[2] == ARGV[i + 1] then
    redis.call('HSET', run, p .. 'lease', lease_end)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
