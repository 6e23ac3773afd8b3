-- A process's heartbeat: score ARGV[1] (its owner id) in KEYS[1] (``orch:owners``) by when it stops being known alive,
-- ARGV[2] seconds from now by Redis's clock. Workers on other hosts may run clocks seconds apart; the sweeper reads
-- Redis's clock, so a heartbeat stamped by the worker's own clock could make a live process look dead.
local t = redis.call('TIME')
local until_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.6f', until_s), ARGV[1])
return 1
