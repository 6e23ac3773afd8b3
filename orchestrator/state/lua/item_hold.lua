-- Hold items of a map step for another grace while their publish is under way (a long map is sent in groups,
-- engine/mapping.py): each still queued under the task id given gets a lease of grace_s, so item_reclaim.lua finds it
-- live and the sweeper sends no copy of an item the publish has not reached yet. queued_at stays: every message of
-- the publish carries the time it began, which is what the backlog rule compares queued_at with.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: grace_s, then index, task_id pairs.
-- Returns {lease, index, task_id, ...}: the items held (the others were claimed, sent again under another task id,
-- or have ended), for the caller to hold in the lease index until that lease.
local items = KEYS[3]
local t = redis.call('TIME')
local until_ = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1]))
local out = {until_}
for i = 2, #ARGV - 1, 2 do
  local f = ARGV[i] .. ':'
  local row = redis.call('HMGET', items, f .. 'status', f .. 'task')
  if row[1] == 'queued' and row[2] == ARGV[i + 1] then
    redis.call('HSET', items, f .. 'lease', until_)
    out[#out + 1] = ARGV[i]
    out[#out + 1] = ARGV[i + 1]
  end
end
return out
