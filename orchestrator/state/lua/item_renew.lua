-- Extend the leases of items still running on this worker (renew.lua's rule, per item).
-- KEYS[1] run hash, KEYS[2] its event stream (unused), KEYS[3] the step's item hash. ARGV: the leases' new end (Redis's
-- clock as the calling process reckons it), then index, task_id pairs. Returns {renewed_flag...}.
local run, items = KEYS[1], KEYS[3]
local lease_end = string.format('%.6f', tonumber(ARGV[1]))
local out = {}
local status = redis.call('HGET', run, 'status')
for i = 2, #ARGV, 2 do
  local f = ARGV[i] .. ':'
  local row = redis.call('HMGET', items, f .. 'status', f .. 'task')
  if status == 'running' and row[1] == 'running' and row[2] == ARGV[i + 1] then
    redis.call('HSET', items, f .. 'lease', lease_end)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
