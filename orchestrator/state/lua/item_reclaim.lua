-- Recover an item behind an expired lease (reclaim.lua's rules, per item): a running item whose worker died is
-- re-queued under new_task (the error recorded); a queued one whose message was lost is sent again under its own
-- task id, unless the step queues hold a backlog it is likely still waiting in (backlog_wait_s > 0): then it is held
-- for another grace, until it has waited backlog_wait_s since it was queued (or last sent).
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, index, expected_task,
-- new_task, error_json, grace_s, backlog_wait_s, owner_dead ('1': the process running it stopped beating; its lease
-- is not waited for).
-- An ended item whose finish queued refills ("refill" field) and whose lease entry is still there: its worker died
-- before holding them.
-- Returns {"ok", def_hash, generation, task_id, lease} to publish; {"live", lease}; {"skip"};
-- {"refill", index, task_id, ...} (the refills to hold).
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, index, expected, new_task, err = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local grace, backlog_wait = tonumber(ARGV[6]), tonumber(ARGV[7] or '0')
local owner_dead = ARGV[8] == '1'
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'status', 'def_hash', 'gen', p .. 'status', 'seq')
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'lease', f .. 'queued_at', f .. 'attempts',
  f .. 'refill')
local status = row[1]
if head[1] ~= 'running' or head[4] ~= 'running' or row[2] ~= expected then return {'skip'} end
if ITEM_ENDED[status] and row[6] and row[6] ~= '' then
  -- Finished, but its worker died before holding the items its finish queued: those still queued under the task
  -- it gave them are returned, to be held and sent again.
  local out = {'refill'}
  local pairs_ = {}
  for v in string.gmatch(row[6], '[^,]+') do pairs_[#pairs_ + 1] = v end
  for i = 1, #pairs_ - 1, 2 do
    local g = pairs_[i] .. ':'
    local other = redis.call('HMGET', items, g .. 'status', g .. 'task')
    if other[1] == 'queued' and other[2] == pairs_[i + 1] then
      out[#out + 1] = pairs_[i]
      out[#out + 1] = pairs_[i + 1]
    end
  end
  redis.call('HDEL', items, f .. 'refill')
  return out
end
if status ~= 'running' and status ~= 'queued' then return {'skip'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local lease = tonumber(row[3] or '')
if lease and lease > now and not (owner_dead and status == 'running') then return {'live', row[3]} end
local until_ = string.format('%.6f', now + grace)
if status == 'queued' then
  local since = tonumber(row[4] or now)
  if backlog_wait > 0 and now - since < backlog_wait then
    -- Held for another grace, as reclaim.lua holds a step: the backlog wait of a map's own burst of messages is
    -- about the time since its items were queued, so holding them only to its end would bring thousands of them
    -- back at every sweep.
    redis.call('HSET', items, f .. 'lease', until_)
    return {'live', until_}
  end
  -- Sent again: the copy sent now is the one that may be waiting (queued_at is when its message was sent), so a
  -- long backlog resends it again only once it has waited as long again, not at every grace.
  redis.call('HSET', items, f .. 'lease', until_, f .. 'queued_at', string.format('%.6f', now))
  return {'ok', head[2], head[3], expected, until_}
end
local stamp = string.format('%.6f', now)
redis.call('HSET', items, f .. 'status', 'queued', f .. 'task', new_task, f .. 'lease', until_, f .. 'queued_at', stamp,
  f .. 'error', err)
count_move(run, p, 'running', 'queued')
events_from(head[5])
emit(run, events, stamp, 'item_lost', step, tonumber(row[5]) or 0, '{"index":' .. index .. ',"error":' .. err .. '}')
emitted(run)
return {'ok', head[2], head[3], new_task, until_}
