-- Admit one LLM call to a model, cluster-wide: the provider's cool-down first, then two token buckets, requests per
-- minute and tokens per minute, both refilled continuously and full at rest (as the provider's own limits are).
-- KEYS[1] the model's limiter hash, KEYS[2] the caller's reservation (same slot). ARGV: rpm (0 = none), tpm
-- (0 = none), estimated tokens, request burst (the request bucket's size), reserve ('1': book the caller a place).
-- A caller that must wait is booked, when it asks to be: the buckets are charged now (they go below zero) and the
-- wait is until its place comes, so callers are served first come, first served, each deferred once. When it comes
-- back its booking lets it through uncharged (unless the model is cooling down: then it keeps the booking).
-- Returns {"ok"}, or {"cooldown"|"rate_limit", seconds to wait as a string}.
local key, booking = KEYS[1], KEYS[2]
local rpm, tpm, want, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local s = redis.call('HMGET', key, 'cooldown_until', 'requests', 'tokens', 'ts')
local cooldown = tonumber(s[1]) or 0
if cooldown > now then return {'cooldown', string.format('%.6f', cooldown - now)} end
-- A model without limits only has its cool-down to honour: nothing to count.
if rpm == 0 and tpm == 0 then return {'ok'} end
if redis.call('DEL', booking) == 1 then return {'ok'} end
local elapsed = math.max(0, now - (tonumber(s[4]) or now))
local requests = rpm > 0 and math.min(burst, (tonumber(s[2]) or burst) + elapsed * rpm / 60) or 0
local tokens = tpm > 0 and math.min(tpm, (tonumber(s[3]) or tpm) + elapsed * tpm / 60) or 0
-- A call bigger than the whole minute's tokens would never fit: it is charged a full minute instead.
if tpm > 0 then want = math.min(want, tpm) end
local wait = 0
if rpm > 0 and requests < 1 then wait = math.max(wait, (1 - requests) * 60 / rpm) end
if tpm > 0 and tokens < want then wait = math.max(wait, (want - tokens) * 60 / tpm) end
if wait == 0 or ARGV[5] == '1' then
  requests = requests - 1
  tokens = tokens - want
end
redis.call('HSET', key, 'requests', string.format('%.6f', requests), 'tokens', string.format('%.6f', tokens),
  'ts', string.format('%.6f', now))
redis.call('EXPIRE', key, 3600)
if wait > 0 then
  if ARGV[5] == '1' then redis.call('SET', booking, '1', 'EX', math.ceil(wait) + 600) end
  return {'rate_limit', string.format('%.6f', wait)}
end
return {'ok'}
