-- Expand a claimed map step into its items and queue the first of them.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id,
-- max_parallel (0: no limit), grace_s, task_prefix, count, then count pairs of item_json, result_key.
-- An item that succeeded in an earlier generation with the same result key keeps its result (a resume re-runs only
-- the rest); every other item becomes pending. The step stays "running" under the expanding task, with a lease of
-- grace_s that the sweeper only extends while items are unfinished (see reclaim.lua): should the worker finishing
-- the last item die before it records the step, that lease brings the step back to be finished.
-- Returns {"stale"} | {"ok", ended, total, index, task_id, ...} (the items to publish).
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task = ARGV[1], ARGV[2], ARGV[3]
local max_parallel, grace, prefix, count = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'map_gen', p .. 'items_total')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return {'stale'} end
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = string.format('%.6f', clock)
local out = {'ok', 0, 0}
if head[4] == gen then
  -- Expanded already in this generation: a redelivered or recovered step message only checks on the items.
  out[2] = ended_count(run, p)
  out[3] = tonumber(head[5] or '0')
  return out
end
local kept = 0
-- Never expanded before: no item has a field yet, and absent fields read as empty (task, lease) or 0 (attempts,
-- base), so a fresh item is written with what it has, no read and no clearing (two fields fewer per item kept).
local fresh = not head[5]
for i = 0, count - 1 do
  local f = i .. ':'
  local item, key = ARGV[8 + 2 * i], ARGV[9 + 2 * i]
  local row = fresh and {} or redis.call('HMGET', items, f .. 'status', f .. 'key', f .. 'attempts')
  if row[1] == 'succeeded' and key ~= '' and row[2] == key then
    kept = kept + 1
  elseif not row[1] then
    if key ~= '' then
      redis.call('HSET', items, f .. 'status', 'pending', f .. 'item', item, f .. 'key', key)
    else
      redis.call('HSET', items, f .. 'status', 'pending', f .. 'item', item)
    end
  else
    redis.call('HSET', items, f .. 'status', 'pending', f .. 'item', item, f .. 'key', key, f .. 'task', '',
      f .. 'lease', '', f .. 'attempts', row[3] or 0, f .. 'base', row[3] or 0)
    redis.call('HDEL', items, f .. 'output', f .. 'error', f .. 'started_at', f .. 'finished_at')
  end
end
-- An earlier, longer list leaves items past the new end: drop them.
for i = count, (tonumber(head[5] or '0') or 0) - 1 do
  local f = i .. ':'
  redis.call('HDEL', items, f .. 'status', f .. 'item', f .. 'key', f .. 'task', f .. 'lease', f .. 'attempts',
    f .. 'base', f .. 'output', f .. 'error', f .. 'started_at', f .. 'finished_at', f .. 'queued_at', f .. 'child_run_id', f .. 'child_counted')
end
redis.call('HSET', run, p .. 'items_total', count, p .. 'items_pending', count - kept, p .. 'items_queued', 0,
  p .. 'items_running', 0, p .. 'items_waiting', 0, p .. 'items_succeeded', kept, p .. 'items_failed', 0,
  p .. 'items_skipped', 0, p .. 'items_cancelled', 0, p .. 'cursor', 0, p .. 'map_gen', gen, p .. 'max_parallel', max_parallel,
  p .. 'lease', string.format('%.6f', clock + grace))
redis.call('PEXPIRE', items, redis.call('PTTL', run))
take(run, items, p, room(run, p), prefix, now, out)
out[2] = kept
out[3] = count
return out
