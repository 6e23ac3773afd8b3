-- Cancel every unfinished item of a map step whose run was just cancelled or timed out (after stop.lua).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation.
-- Returns {n_cancelled, task_id of each item that was running or queued, ...} (to interrupt); {0} when the run is
-- running again (resumed meanwhile) or in another generation.
local run, items = KEYS[1], KEYS[3]
local step, gen = ARGV[1], ARGV[2]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'status', 'gen', p .. 'items_total', p .. 'map_gen')
if head[1] == 'running' or head[2] ~= gen or head[4] ~= gen then return {0} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
local out = {0}
for i = 0, (tonumber(head[3] or '0') or 0) - 1 do
  local f = i .. ':'
  local row = redis.call('HMGET', items, f .. 'status', f .. 'task')
  local status = row[1]
  if status == 'pending' or status == 'queued' or status == 'running' or status == 'waiting' then
    redis.call('HSET', items, f .. 'status', 'cancelled', f .. 'finished_at', now, f .. 'lease', '')
    count_move(run, p, status, 'cancelled')
    out[1] = out[1] + 1
    if status ~= 'pending' and status ~= 'waiting' and row[2] and row[2] ~= '' then out[#out + 1] = row[2] end
  end
end
return out
