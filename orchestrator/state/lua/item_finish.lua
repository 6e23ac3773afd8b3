-- Record an item's final outcome and queue the next pending items into the places it frees.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the step's item hash. ARGV: step, generation, task_id, index,
-- outcome, output_json ('' for none), error_json ('' for none), task_prefix.
-- Refills happen here, atomically with the finish, and the finishing worker publishes them: no process polls. The
-- item's "refill" field names them (index,task_id,...) until its lease entry is gone.
-- Returns {"stale"} | {"ok", last ('1' when this was the step's last unfinished item, else ''), step_task,
-- index, task_id, ...} (the items to publish).
local run, events, items = KEYS[1], KEYS[2], KEYS[3]
local step, gen, task, index, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local output, err, prefix = ARGV[6], ARGV[7], ARGV[8]
local p = 's:' .. step .. ':'
local f = index .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', 'seq', p .. 'task', p .. 'items_total')
local row = redis.call('HMGET', items, f .. 'status', f .. 'task', f .. 'attempts')
if head[1] ~= gen or row[1] ~= 'running' or row[2] ~= task then return {'stale'} end
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
-- An ended item keeps only what its record shows (and its task, for item_reclaim.lua): lease and queued_at go.
local set = {f .. 'status', outcome, f .. 'finished_at', now}
if output ~= '' then set[#set + 1] = f .. 'output' set[#set + 1] = output end
if err ~= '' then set[#set + 1] = f .. 'error' set[#set + 1] = err end
redis.call('HSET', items, unpack(set))
if output ~= '' then
  redis.call('HDEL', items, f .. 'lease', f .. 'queued_at')
else
  redis.call('HDEL', items, f .. 'lease', f .. 'queued_at', f .. 'output')
end
count_move(run, p, 'running', outcome)
events_from(head[3])
local detail = '{"index":' .. index .. '}'
if err ~= '' then detail = '{"index":' .. index .. ',"error":' .. err .. '}' end
emit(run, events, now, 'item_' .. outcome, step, tonumber(row[3]) or 0, detail)
emitted(run)
local out = {'ok', '', head[4] or ''}
if head[2] == 'running' and take(run, items, p, room(run, p), prefix, now, out) > 0 then
  -- What this finish queued, for item_reclaim.lua should its worker die before holding them in the lease index.
  redis.call('HSET', items, f .. 'refill', table.concat(out, ',', 4))
end
if head[2] == 'running' and ended_count(run, p) >= tonumber(head[5] or '0') then out[2] = '1' end
return out
