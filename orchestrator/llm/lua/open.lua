-- Open one LLM call in one round trip: the reply cache, then admit.lua (cool-down, rate limits, booking), then
-- budget.lua's reserve. Runs after admit.lua, budget.lua and settle.lua, each wrapped as a function of (KEYS, ARGV)
-- (see governor.py), so the rules are those scripts' own, applied atomically together. Single Redis only: its keys
-- span the run's slot and the model's (a Redis Cluster takes the unfolded path).
-- KEYS[1] the run hash, KEYS[2] the run's reply cache, KEYS[3] the shared reply, KEYS[4] the model's limiter,
-- KEYS[5] the caller's booking. ARGV: lookup ('0' none, '1' the run's replies, '2' then the shared one), digest,
-- rpm, tpm, estimated tokens, burst, reserve ('1': book a waiting caller), worst case (nano-dollars), budget
-- (nano-dollars, -1 = none); optionally a guard: a step's status field, its task field and a task id (a call opened
-- ahead for a child its parent's finish claims, in the finish's round trip: :mod:`orchestrator.llm.preopen`).
-- Returns {'unclaimed'} when the guard's step is not running under that task id (nothing done), else
-- {'cached', reply}, {'cooldown'|'rate_limit', seconds}, {'budget_exceeded', spent, held} or {'ok'}: on 'ok' the
-- call is counted and its worst case held, and close.lua must follow.
if ARGV[10] then
  local step = redis.call('HMGET', KEYS[1], ARGV[10], ARGV[11])
  if step[1] ~= 'running' or step[2] ~= ARGV[12] then return {'unclaimed'} end
end
if ARGV[1] ~= '0' then
  local body = redis.call('HGET', KEYS[2], ARGV[2])
  if not body and ARGV[1] == '2' then body = redis.call('GET', KEYS[3]) end
  if body then return {'cached', body} end
end
local admitted = admit({KEYS[4], KEYS[5]}, {ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]})
if admitted[1] ~= 'ok' then return admitted end
local held = budget({KEYS[1]}, {'reserve', ARGV[8], ARGV[9]})
if held[1] ~= 1 then
  -- Refused: the request and tokens go back to the rate limit, as if the call had never been admitted.
  settle({KEYS[4]}, {ARGV[4], ARGV[5], 0, 1, 0})
  return {'budget_exceeded', held[2], held[3]}
end
return {'ok'}
