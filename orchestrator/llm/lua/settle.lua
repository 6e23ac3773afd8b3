-- Settle an admitted LLM call with what it really used, and start a provider cool-down if it asked for one.
-- KEYS[1] the model's limiter hash. ARGV: tpm, tokens estimated at admission, tokens used, requests to give back
-- (1 when the call was never made), cool-down seconds (0 = none).
-- The token bucket is charged the difference (it may go below zero: the next calls then wait for the debt).
local key = KEYS[1]
local tpm, estimated, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refund, cooldown = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if tpm > 0 and estimated ~= used then
  local tokens = tonumber(redis.call('HGET', key, 'tokens') or tpm)
  redis.call('HSET', key, 'tokens', string.format('%.6f', math.min(tpm, tokens + math.min(estimated, tpm) - used)))
end
if refund > 0 then
  local requests = tonumber(redis.call('HGET', key, 'requests'))
  if requests then redis.call('HSET', key, 'requests', string.format('%.6f', requests + refund)) end
end
if cooldown > 0 then
  local until_ = now + cooldown
  if until_ > (tonumber(redis.call('HGET', key, 'cooldown_until')) or 0) then
    redis.call('HSET', key, 'cooldown_until', string.format('%.6f', until_))
  end
end
redis.call('EXPIRE', key, 3600)
return 1
