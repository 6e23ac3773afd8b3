-- Close an opened LLM call in one round trip: the reply stored, settle.lua on the model's limiter (when it counts
-- tokens or the provider asked for a cool-down), and budget.lua's settle on the run. Wrapped like open.lua.
-- KEYS[1] the run hash, KEYS[2] the model's limiter, KEYS[3] the run's reply cache, KEYS[4] the shared reply.
-- ARGV: settle the limiter ('1'/'0'), tpm, tokens estimated, tokens used, cool-down seconds, worst case held
-- (nano-dollars), real cost (nano-dollars), billed ('1'/'0'), input tokens, output tokens, store ('0' no, '1' for
-- the run, '2' for every run too), digest, reply, the run cache's time to live, the shared reply's, and optionally
-- the requests to give back to the rate limit (1 for a call opened but never made: its admission given back whole).
-- The reply first: a script's writes before an error stay, so nothing after can lose it.
if ARGV[11] ~= '0' then
  redis.call('HSET', KEYS[3], ARGV[12], ARGV[13])
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[14]))
  if ARGV[11] == '2' then redis.call('SET', KEYS[4], ARGV[13], 'EX', tonumber(ARGV[15])) end
end
if ARGV[1] == '1' then settle({KEYS[2]}, {ARGV[2], ARGV[3], ARGV[4], ARGV[16] or 0, ARGV[5]}) end
budget({KEYS[1]}, {'settle', ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]})
return 1
