-- Prepended (after _events.lua) to the scripts that end a run (finish, stop, fail_dispatch), and to resume.lua: keep
-- the ended run for its retention, lean. A step's per-attempt scratch fields (base.ENDED_SCRATCH_FIELDS) are read by
-- nothing once the run is over (a resume writes each of them afresh for the steps it resets); "cache_key" and
-- "cached" go too while they say nothing ('', or "cached" other than '1'), and so do the run's "idempotency_key" and
-- "timeout_s" when ''.
-- Redis keeps a hash whose every value fits in 64 bytes (hash-max-listpack-value's default) as one compact listpack;
-- a single longer value (a step's output, mostly) makes it a hash table, about 75 bytes more per field, and it stays
-- one. So the ended run's longer values move to one string beside the hash (RUN:large, keys.large_values_key),
-- except the fields a listing reads (ENDED_KEEP, base.SUMMARY_FIELDS), and the hash is written afresh without them,
-- a listpack again. The hash's field "large" holds a token (the run's event count when it ended) that the string
-- starts with, so that a reader that read the hash, then the string, can tell the two belong together. The string is
-- "TOKEN\n" then "LEN:NAME" and "LEN:VALUE" (lengths in bytes) for every field it holds. A resume puts the values
-- back into the hash before anything else (ended_unpack).
-- The event stream is rewritten at its exact size (DUMP, RESTORE): Redis gives a stream node 4 KB up front, which a
-- run's few dozen events never fill. A run with more events than ENDED_REWRITE_EVENTS keeps its stream as it is:
-- the rewrite would cost more than the one node's slack it saves.
local ENDED_SCRATCH = {task = true, lease = true, pending = true, attempt_started_at = true, force = true,
  attempt_base = true, deferred_until = true, deferral = true, carrier = true}
local ENDED_IF_EMPTY = {cache_key = true, cached = true}
local ENDED_RUN_IF_EMPTY = {idempotency_key = true, timeout_s = true}
local ENDED_KEEP = {run_id = true, workflow = true, version = true, status = true, gen = true, created_at = true,
  finished_at = true, started_at = true, error = true, first_failure = true, llm_spent_nusd = true, llm_calls = true,
  llm_input_tokens = true, llm_output_tokens = true}
local ENDED_WIDE = 64
local ENDED_MARK = 'large'
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
local function ended_large(run)
  return run .. ':large'
end
-- Put an ended run's large values back into its hash; a field written into the hash since the run ended wins.
local function ended_unpack(run)
  if not redis.call('HGET', run, ENDED_MARK) then return end
  local blob = redis.call('GET', ended_large(run))
  redis.call('DEL', ended_large(run))
  redis.call('HDEL', run, ENDED_MARK)
  if not blob then return end
  local names, values = {}, {}
  local pos = string.find(blob, '\n', 1, true) + 1
  while pos <= #blob do
    for _, into in ipairs({names, values}) do
      local colon = string.find(blob, ':', pos, true)
      local n = tonumber(string.sub(blob, pos, colon - 1))
      into[#into + 1] = string.sub(blob, colon + 1, colon + n)
      pos = colon + n + 1
    end
  end
  local present = ended_chunks('HMGET', run, names)
  local back = {}
  for i, name in ipairs(names) do
    if not present[i] then
      back[#back + 1] = name
      back[#back + 1] = values[i]
    end
  end
  ended_chunks('HSET', run, back)
end
local function ended(run, events, retention)
  local all = redis.call('HGETALL', run)
  for i = 1, #all, 2 do
    if all[i] == ENDED_MARK then
      ended_unpack(run)
      all = redis.call('HGETALL', run)
      break
    end
  end
  local keep, large, drop, rewrite = {}, {}, {}, false
  for i = 1, #all, 2 do
    local name, v = all[i], all[i + 1]
    local suffix = string.match(name, '^s:.+:([%w_]+)$')
    local gone = (suffix and ENDED_SCRATCH[suffix])
      or (((suffix and ENDED_IF_EMPTY[suffix]) or ENDED_RUN_IF_EMPTY[name])
        and (v == '' or (v ~= '1' and string.sub(name, -7) == ':cached')))
    if gone then
      drop[#drop + 1] = name
      rewrite = rewrite or #v > ENDED_WIDE
    elseif #v > ENDED_WIDE and not ENDED_KEEP[name] then
      large[#large + 1] = #name .. ':' .. name .. #v .. ':' .. v
      rewrite = true
    else
      keep[#keep + 1] = name
      keep[#keep + 1] = v
    end
  end
  local ttl_ms = math.max(1, math.floor(retention * 1000))
  if rewrite then
    -- Written afresh: a hash table never turns back into a listpack, whatever is deleted from it.
    redis.call('DEL', run)
    if #large > 0 then
      local token = tostring(_seq or 0)
      redis.call('SET', ended_large(run), token .. '\n' .. table.concat(large), 'PX', ttl_ms)
      keep[#keep + 1] = ENDED_MARK
      keep[#keep + 1] = token
    end
    ended_chunks('HSET', run, keep)
  else
    ended_chunks('HDEL', run, drop)
  end
  redis.call('PEXPIRE', run, ttl_ms)
  local dump = (_seq or 0) <= ENDED_REWRITE_EVENTS and redis.call('DUMP', events)
  if dump then
    redis.call('RESTORE', events, ttl_ms, dump, 'REPLACE')
  else
    redis.call('PEXPIRE', events, ttl_ms)
  end
end
