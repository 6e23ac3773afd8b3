-- Prepended (after _events.lua) to the scripts that end a run (finish, stop, fail_dispatch): keep the ended run for
-- its retention, lean. A step's per-attempt scratch fields (base.ENDED_SCRATCH_FIELDS) are read by nothing once the
-- run is over (a resume writes each of them afresh for the steps it resets); "cache_key" and "cached" go too while
-- they say nothing ('', or "cached" other than '1'), and so do the run's "idempotency_key" and "timeout_s" when ''.
-- The event stream is rewritten at its exact size (DUMP, RESTORE): Redis gives a stream node 4 KB up front, which a
-- run's few dozen events never fill. A run with more events than ENDED_REWRITE_EVENTS keeps its stream as it is:
-- the rewrite would cost more than the one node's slack it saves.
local ENDED_SCRATCH = {task = true, lease = true, pending = true, attempt_started_at = true, force = true,
  attempt_base = true, deferred_until = true, deferral = true, carrier = true}
local ENDED_IF_EMPTY = {cache_key = true, cached = true}
local ENDED_RUN_IF_EMPTY = {idempotency_key = true, timeout_s = true}
local ENDED_REWRITE_EVENTS = 1000
local ENDED_CHUNK = 500  -- unpack() stays far below Lua's stack limit whatever the number of steps
local function ended_chunks(command, key, names)
  local out = {}
  for i = 1, #names, ENDED_CHUNK do
    local reply = redis.call(command, key, unpack(names, i, math.min(i + ENDED_CHUNK - 1, #names)))
    if type(reply) == 'table' then for _, v in ipairs(reply) do out[#out + 1] = v end end
  end
  return out
end
local function ended(run, events, retention)
  local drop, maybe = {}, {}
  for _, name in ipairs(redis.call('HKEYS', run)) do
    local suffix = string.match(name, '^s:.+:([%w_]+)$')
    if suffix and ENDED_SCRATCH[suffix] then
      drop[#drop + 1] = name
    elseif (suffix and ENDED_IF_EMPTY[suffix]) or ENDED_RUN_IF_EMPTY[name] then
      maybe[#maybe + 1] = name
    end
  end
  local values = ended_chunks('HMGET', run, maybe)
  for i, name in ipairs(maybe) do
    local v = values[i]
    if not v or v == '' or (v ~= '1' and string.sub(name, -7) == ':cached') then drop[#drop + 1] = name end
  end
  ended_chunks('HDEL', run, drop)
  redis.call('EXPIRE', run, retention)
  local dump = (_seq or 0) <= ENDED_REWRITE_EVENTS and redis.call('DUMP', events)
  if dump then
    redis.call('RESTORE', events, math.max(1, math.floor(retention * 1000)), dump, 'REPLACE')
  else
    redis.call('EXPIRE', events, retention)
  end
end
