-- A sweeper's turn in the sweepers index KEYS[1] (``orch:sweepers``): score ARGV[1] (its owner id) by when it stops
-- being known alive, ARGV[2] seconds from now by Redis's clock, drop those whose time ran out, and return how many
-- sweepers are alive: each takes its share of the buckets.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now))
redis.call('ZADD', KEYS[1], string.format('%.6f', now + tonumber(ARGV[2])), ARGV[1])
return redis.call('ZCARD', KEYS[1])
