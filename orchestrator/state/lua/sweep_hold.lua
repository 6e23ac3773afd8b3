-- A sweeper's hold on one bucket of the global indices: KEYS[1] is the bucket's sweeper lock, ARGV[1] the sweeper's
-- owner id, ARGV[2] the hold in milliseconds, ARGV[3] what to do: 'keep' renews the hold if ARGV[1] has it, 'take'
-- also takes the bucket when nobody holds it, 'drop' releases it if ARGV[1] has it. Returns 1 while ARGV[1] holds it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  if ARGV[3] == 'drop' then
    redis.call('DEL', KEYS[1])
    return 0
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder and ARGV[3] == 'take' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
