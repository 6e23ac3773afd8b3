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
-- "TOKEN\n" then "LEN:NAME" and "LEN:VALUE" (lengths in bytes) for every field it holds.
-- Each listpack entry still pays its name: an ended step's attempt count and times (ENDED_PACKED, each read by no
-- script while the run is over) go into one field "s:STEP:" as "ATTEMPTS|QUEUED_AT|STARTED_AT|FINISHED_AT" ('' for
-- one the step has not). A resume puts everything back as it was before anything else (ended_unpack).
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
local ENDED_PACKED = {attempts = 1, queued_at = 2, started_at = 3, finished_at = 4}
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
-- Whether the hash holds what ended() leaves: large values, or a step's packed fields.
local function ended_packed(all)
  for i = 1, #all, 2 do
    if all[i] == ENDED_MARK or string.match(all[i], '^s:.+:$') then return true end
  end
  return false
end
-- Put back what ended() packed; a field written into the hash since the run ended wins over its packed value.
local function ended_unpack(run)
  local all = redis.call('HGETALL', run)
  if not ended_packed(all) then return end
  local present, found, back, gone = {}, {}, {}, {}
  for i = 1, #all, 2 do present[all[i]] = true end
  for i = 1, #all, 2 do
    found[#found + 1] = all[i]
    found[#found + 1] = all[i + 1]
  end
  if present[ENDED_MARK] then
    gone[#gone + 1] = ENDED_MARK
    local blob = redis.call('GET', ended_large(run))
    redis.call('DEL', ended_large(run))
    local pos = blob and (string.find(blob, '\n', 1, true) + 1) or 1
    while blob and pos <= #blob do
      for _ = 1, 2 do
        local colon = string.find(blob, ':', pos, true)
        local n = tonumber(string.sub(blob, pos, colon - 1))
        found[#found + 1] = string.sub(blob, colon + 1, colon + n)
        pos = colon + n + 1
      end
      if present[found[#found - 1]] then
        found[#found] = nil
        found[#found] = nil
      elseif not string.match(found[#found - 1], '^s:.+:$') then
        back[#back + 1] = found[#found - 1]
        back[#back + 1] = found[#found]
      end
    end
  end
  for i = 1, #found, 2 do
    local prefix = string.match(found[i], '^s:.+:$')
    if prefix then
      gone[#gone + 1] = found[i]
      local parts = {}
      for part in string.gmatch(found[i + 1] .. '|', '([^|]*)|') do parts[#parts + 1] = part end
      for suffix, at in pairs(ENDED_PACKED) do
        if parts[at] and parts[at] ~= '' and not present[prefix .. suffix] then
          back[#back + 1] = prefix .. suffix
          back[#back + 1] = parts[at]
        end
      end
    end
  end
  ended_chunks('HDEL', run, gone)
  ended_chunks('HSET', run, back)
end
local function ended(run, events, retention)
  local all = redis.call('HGETALL', run)
  if ended_packed(all) then
    ended_unpack(run)
    all = redis.call('HGETALL', run)
  end
  local keep, large, packs, order = {}, {}, {}, {}
  local function put(name, v)
    if #v > ENDED_WIDE and not ENDED_KEEP[name] then
      large[#large + 1] = #name .. ':' .. name .. #v .. ':' .. v
    else
      keep[#keep + 1] = name
      keep[#keep + 1] = v
    end
  end
  for i = 1, #all, 2 do
    local name, v = all[i], all[i + 1]
    local prefix, suffix = string.match(name, '^(s:.+:)([%w_]+)$')
    local gone = (suffix and ENDED_SCRATCH[suffix])
      or (((suffix and ENDED_IF_EMPTY[suffix]) or ENDED_RUN_IF_EMPTY[name])
        and (v == '' or (v ~= '1' and string.sub(name, -7) == ':cached')))
    if gone then
      -- left out of the hash written below
    elseif suffix and ENDED_PACKED[suffix] and v ~= '' and not string.find(v, '|', 1, true) then
      if not packs[prefix] then
        packs[prefix] = {'', '', '', ''}
        order[#order + 1] = prefix
      end
      packs[prefix][ENDED_PACKED[suffix]] = v
    else
      put(name, v)
    end
  end
  for _, prefix in ipairs(order) do put(prefix, table.concat(packs[prefix], '|')) end
  local ttl_ms = math.max(1, math.floor(retention * 1000))
  -- Written afresh: a hash table never turns back into a listpack, whatever is deleted from it.
  redis.call('DEL', run)
  if #large > 0 then
    local token = tostring(_seq or 0)
    redis.call('SET', ended_large(run), token .. '\n' .. table.concat(large), 'PX', ttl_ms)
    keep[#keep + 1] = ENDED_MARK
    keep[#keep + 1] = token
  end
  ended_chunks('HSET', run, keep)
  redis.call('PEXPIRE', run, ttl_ms)
  local dump = (_seq or 0) <= ENDED_REWRITE_EVENTS and redis.call('DUMP', events)
  if dump then
    redis.call('RESTORE', events, ttl_ms, dump, 'REPLACE')
  else
    redis.call('PEXPIRE', events, ttl_ms)
  end
end
