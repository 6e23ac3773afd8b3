-- Prepended to every item script (after _events.lua): a map step's items live in their own hash (KEYS[3],
-- fields "INDEX:FIELD"); their counts by status are step fields of the run hash ("s:STEP:items_STATUS"), so a
-- status read never walks the items.
local ITEM_ENDED = {succeeded = true, failed = true, skipped = true, cancelled = true}
local function count_move(run, p, from, to, by)
  by = by or 1
  if from then redis.call('HINCRBY', run, p .. 'items_' .. from, -by) end
  if to then redis.call('HINCRBY', run, p .. 'items_' .. to, by) end
end
-- Queue up to n pending items from the step's cursor on, each under the task id prefix .. '.' .. index; appends
-- index, task_id pairs to out and returns how many it took. The cursor only moves forward (a resume resets it), so
-- every item is looked at once per generation however the refills are split.
local function take(run, items, p, n, prefix, now, out)
  local row = redis.call('HMGET', run, p .. 'items_total', p .. 'cursor')
  local total, cursor = tonumber(row[1] or '0'), tonumber(row[2] or '0')
  local taken = 0
  while taken < n and cursor < total do
    local f = cursor .. ':'
    if redis.call('HGET', items, f .. 'status') == 'pending' then
      local task = prefix .. '.' .. cursor
      -- No lease field: a pending item has none (expand clears a reset one's), and none reads as expired.
      redis.call('HSET', items, f .. 'status', 'queued', f .. 'task', task, f .. 'queued_at', now)
      out[#out + 1] = cursor
      out[#out + 1] = task
      taken = taken + 1
    end
    cursor = cursor + 1
  end
  redis.call('HSET', run, p .. 'cursor', cursor)
  if taken > 0 then count_move(run, p, 'pending', 'queued', taken) end
  return taken
end
-- How many items may start now: all pending ones without max_parallel, else the free places (an item waiting for
-- its child run holds one).
local function room(run, p)
  local row = redis.call('HMGET', run, p .. 'max_parallel', p .. 'items_queued', p .. 'items_running', p .. 'items_total',
    p .. 'items_waiting')
  local limit = tonumber(row[1] or '0') or 0
  if limit <= 0 then return tonumber(row[4] or '0') end
  local busy = (tonumber(row[2] or '0') or 0) + (tonumber(row[3] or '0') or 0) + (tonumber(row[5] or '0') or 0)
  return math.max(0, limit - busy)
end
local function ended_count(run, p)
  local row = redis.call('HMGET', run, p .. 'items_succeeded', p .. 'items_failed', p .. 'items_skipped',
    p .. 'items_cancelled')
  local n = 0
  for i = 1, 4 do n = n + (tonumber(row[i] or '0') or 0) end
  return n
end
