-- A run's LLM spend, in nano-dollars (integers: sums stay exact). KEYS[1] the run hash.
-- ARGV[1] = "reserve": ARGV[2] worst-case cost, ARGV[3] budget (-1 = none). Holds the worst case until settled;
--   refuses, for good, once spent + held + this call would pass the budget. Returns {1} or {0, spent, held}.
--   A child run's hash may carry budget_cap_nusd (what its parent had left when it started): the lower one holds.
-- ARGV[1] = "settle": ARGV[2] the cost held, ARGV[3] the real cost, ARGV[4] "1" when the provider billed a reply,
--   ARGV[5] and ARGV[6] its input and output tokens (run totals for listings). Returns {1, spent}.
local run, op, amount = KEYS[1], ARGV[1], tonumber(ARGV[2])
if op == 'reserve' then
  local budget = tonumber(ARGV[3])
  local s = redis.call('HMGET', run, 'llm_spent_nusd', 'llm_held_nusd', 'budget_exhausted', 'status', 'budget_cap_nusd')
  if not s[4] then return {0, '0', '0', 'missing'} end
  local cap = tonumber(s[5])
  if cap and (budget < 0 or cap < budget) then budget = cap end
  local spent, held = tonumber(s[1]) or 0, tonumber(s[2]) or 0
  if budget >= 0 and (s[3] == '1' or spent + held + amount > budget) then
    redis.call('HSET', run, 'budget_exhausted', '1')
    return {0, tostring(spent), tostring(held)}
  end
  redis.call('HINCRBY', run, 'llm_held_nusd', amount)
  return {1}
end
local real = tonumber(ARGV[3])
if not redis.call('HGET', run, 'status') then return {0, '0'} end
-- 0 - amount, not -amount: Lua's -0 reaches Redis as "-0", which HINCRBY refuses.
redis.call('HINCRBY', run, 'llm_held_nusd', 0 - amount)
local spent = redis.call('HINCRBY', run, 'llm_spent_nusd', real)
if ARGV[4] == '1' then
  redis.call('HINCRBY', run, 'llm_calls', 1)
  redis.call('HINCRBY', run, 'llm_input_tokens', tonumber(ARGV[5]) or 0)
  redis.call('HINCRBY', run, 'llm_output_tokens', tonumber(ARGV[6]) or 0)
end
return {1, tostring(spent)}
