-- Note a submitted definition in the bounded index ``orchestrator workflows`` lists.
-- KEYS[1] the index (sorted set: definition hash -> last submitted), KEYS[2] its records (hash: definition hash ->
-- {"name", "version", "first_submitted"} JSON, the stamp a string). ARGV: definition hash, name, version, keep_s, max entries.
-- Entries not submitted for keep_s (their definition expired) and the oldest beyond max entries are dropped.
-- Returns the number of entries kept.
local index, records = KEYS[1], KEYS[2]
local hash, keep, max = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local stamp = string.format('%.6f', now)
redis.call('ZADD', index, stamp, hash)
-- The stamp stays a string: cjson would round a number to 14 digits.
redis.call('HSETNX', records, hash, cjson.encode({name = ARGV[2], version = tonumber(ARGV[3]), first_submitted = stamp}))
local drop = redis.call('ZRANGEBYSCORE', index, '-inf', string.format('(%.6f', now - keep))
local count = redis.call('ZCARD', index) - #drop
if count > max then
  local oldest = redis.call('ZRANGE', index, #drop, #drop + count - max - 1)
  for _, member in ipairs(oldest) do drop[#drop + 1] = member end
end
for _, member in ipairs(drop) do
  redis.call('ZREM', index, member)
  redis.call('HDEL', records, member)
end
return redis.call('ZCARD', index)
