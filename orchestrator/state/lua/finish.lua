-- Record a step's final outcome, release its children, and close the run when nothing is left.
-- KEYS[1] run hash, KEYS[2] its event stream, KEYS[3] the run's LLM reply cache (dropped when the run succeeds: no
-- step will ask again; a failed run keeps it, so a resume pays for no reply twice), KEYS[4] where the ended run's large
-- values go (_ended.lua); on a single Redis only (a cluster keeps them on other slots, so the caller does it): KEYS[5]
-- the run's bucket of the deadline index, KEYS[6] its bucket of the global stream of run-level events, KEYS[7] its
-- bucket of the lease index.
-- ARGV: step, generation, task_id, outcome, output_json ('' keeps the stored output: a cache hit), error_json,
-- retention_s, cache_key, cached ('1' or ''), success_detail_json ('' for none), rules_json ('' for none: see
-- ReleaseRules), failure (the one-line summary of a 'failed' outcome, else ''), run_id, the run's deadline index
-- member, the global stream's MAXLEN, n_keep (how many arguments the keep request that follows takes; 0 for none),
-- [keep request: lease_s, carrier, most, then per candidate: step, task_id, n_parents, parents..., n_children,
-- children...], [with KEYS[7]: the covers: lease due, grace due, n_covers, then per step this finish may release:
-- step, task_id], children...
-- With KEYS[7], each step released here enters the lease index under the task id its message (or its kept claim)
-- carries, in this script: due at the lease when the script claims it for the slot, else at the grace (its message
-- is published after the reply). A step not released, or kept but refused, enters nothing. Without KEYS[7] the
-- caller covers every step it may release before the script and takes back what it did not.
-- With a keep request ("continuing locally"), the first `most` released children that are candidates are claimed at
-- once, each under its task id, as claim.lua would claim it (claim_step, _claim.lua): the worker slot runs the first
-- next, and the worker's other threads the others, with no round trip of their own; their step_queued and
-- step_started events follow this step's in one script.
-- A child is released (queued) when its last parent ends, or at once when its rule fires on this outcome
-- (rules.early); either way only while it is still "pending", so a step is queued exactly once however its parents
-- race. A child with cancel_others released early cancels its other parents still unfinished (rules.cancel), which
-- end for their own children as "cancelled" (rules.after). Only a failed or upstream_failed leaf (a step without
-- children) fails the run, as in Airflow: the run's state follows its leaves. A failed run's "run_failed" event
-- carries {"error": the first failure's summary, "failed_steps": [every step that failed, in order]}.
-- When the run ends here, with KEYS[5] and KEYS[6] its deadline leaves the index and its end is announced on the
-- global stream ({run_id, type: "run_" .. status, workflow}, as RedisStateCore.announce writes it), after its own
-- run_* event; without them the caller does both.
-- Returns {"stale"} or {"ok", run_status_or_empty, n_released, released_child..., n_cancelled, cancelled_step,
-- task_id, ..., then either (the run ended) parent_run_or_empty, workflow, or (a keep request) n_kept, (kept_child,
-- n_reply, claim_reply...)...} (n_cancelled counts the entries that follow it). A kept child's claim reply holds '='
-- in place of this step's output when output_json gave it (the caller has it: a fan-out's claims would each carry it
-- back).
local run, events = KEYS[1], KEYS[2]
local step, gen, task, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local output, err, retention, cache_key, cached = ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local n_keep = tonumber(ARGV[16])
local first_child = 17 + n_keep
-- The keep request's candidates by name, each with the arguments claim.lua would get.
local candidates, n_candidates, only, i = {}, 0, nil, 20
while i < first_child do
  local c = {task = ARGV[i + 1], parents = {}, children = {}}
  local n_parents = tonumber(ARGV[i + 2])
  for j = 1, n_parents do c.parents[j] = ARGV[i + 2 + j] end
  local n_children = tonumber(ARGV[i + 3 + n_parents])
  for j = 1, n_children do c.children[j] = ARGV[i + 3 + n_parents + j] end
  candidates[ARGV[i]] = c
  n_candidates, only = n_candidates + 1, ARGV[i]
  i = i + 4 + n_parents + n_children
end
-- The covers of the steps this finish may release, by name (KEYS[7] only).
local covers, lease_due, grace_due = nil, nil, nil
if KEYS[7] then
  lease_due, grace_due, covers = ARGV[first_child], ARGV[first_child + 1], {}
  local n_covers = tonumber(ARGV[first_child + 2])
  for j = first_child + 3, first_child + 1 + 2 * n_covers, 2 do covers[ARGV[j]] = ARGV[j + 1] end
  first_child = first_child + 3 + 2 * n_covers
end
-- One candidate and no cancel_others child (the common case: a chain): nothing below writes what its claim reads
-- but its release and this step's own fields, so the claim's read joins this one and its release joins the one HSET.
if n_candidates ~= 1 or (ARGV[11] ~= '' and next(cjson.decode(ARGV[11]).cancel or {}) ~= nil) then only = nil end
local p = 's:' .. step .. ':'
local head, early_read = nil, nil
if only then
  head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'errors', p .. 'attempts', 'seq',
    unpack(claim_reads(only, candidates[only].parents)))
  early_read = {}
  for j = 7, #head do early_read[#early_read + 1] = head[j] end
else
  head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'errors', p .. 'attempts', 'seq')
end
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return {'stale'} end
events_from(head[6])

local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
local fields = {p .. 'status', outcome, p .. 'finished_at', now, p .. 'lease', '', p .. 'cache_key', cache_key,
  p .. 'cached', cached, p .. 'force', ''}
if outcome ~= 'succeeded' then
  -- Only a success is a result to reuse; anything else must not be served from the cache on resume.
  fields[#fields + 1] = p .. 'output'
  fields[#fields + 1] = output
end
if outcome == 'succeeded' and output ~= '' then
  fields[#fields + 1] = p .. 'output'
  fields[#fields + 1] = output
end
if err ~= '' then
  local errors = cjson.decode(head[4] ~= false and head[4] ~= '' and head[4] or '[]')
  errors[#errors + 1] = cjson.decode(err)
  fields[#fields + 1] = p .. 'error'
  fields[#fields + 1] = err
  fields[#fields + 1] = p .. 'errors'
  fields[#fields + 1] = cjson.encode(errors)
end
-- The step's own fields are written last, with the run's event counter (one HSET): nothing below reads them.
local attempt = tonumber(head[5]) or 0
local detail = err
if outcome == 'succeeded' then
  if cached == '1' then detail = '{"cached":true}' elseif ARGV[10] ~= '' then detail = ARGV[10] end
end
emit(run, events, now, 'step_' .. outcome, step, attempt, detail)
if outcome == 'failed' or outcome == 'upstream_failed' then
  redis.call('HINCRBY', run, 'failures', 1)
  if outcome == 'failed' then
    redis.call('HSETNX', run, 'first_failure', step)
    redis.call('HSETNX', run, 'failure', ARGV[12])
    local failed = cjson.decode(redis.call('HGET', run, 'failed_steps') or '[]')
    failed[#failed + 1] = step
    redis.call('HSET', run, 'failed_steps', cjson.encode(failed))
  end
  if #ARGV < first_child then redis.call('HINCRBY', run, 'leaf_failures', 1) end
end

local rules = ARGV[11] ~= '' and cjson.decode(ARGV[11]) or {}
local early, cancel, after = rules.early or {}, rules.cancel or {}, rules.after or {}
local released, cancelled, claimed = {}, {}, {}
local function fires(on, what)
  for _, o in ipairs(on or {}) do if o == what then return true end end
  return false
end
-- One parent of `child` ended with `what`: count it down, and queue the child if this decides it.
local function release(child, on, what)
  local c = 's:' .. child .. ':'
  local left = redis.call('HINCRBY', run, c .. 'pending', -1)
  local status = child == only and early_read[3] or redis.call('HGET', run, c .. 'status')
  if (left == 0 or fires(on, what)) and status == 'pending' then
    if child == only then
      for _, value in ipairs({c .. 'status', 'queued', c .. 'queued_at', now}) do fields[#fields + 1] = value end
    else
      redis.call('HSET', run, c .. 'status', 'queued', c .. 'queued_at', now)
    end
    emit(run, events, now, 'step_queued', child, 0, '')
    released[#released + 1] = child
    return true
  end
  return false
end
for i = first_child, #ARGV do
  local child = ARGV[i]
  if release(child, early[child], outcome) and cancel[child] and redis.call('HGET', run, 's:' .. child .. ':pending') ~= '0' then
    for _, parent in ipairs(cancel[child]) do
      -- This step has ended (its own fields are written below, so its status still reads as running here).
      if parent ~= step then
        local q = 's:' .. parent .. ':'
        local row = redis.call('HMGET', run, q .. 'status', q .. 'task', q .. 'carrier')
        local st = row[1]
        if st == 'pending' or st == 'queued' or st == 'running' or st == 'waiting' then
          redis.call('HSET', run, q .. 'status', 'cancelled', q .. 'finished_at', now, q .. 'lease', '')
          emit(run, events, now, 'step_cancelled', parent, 0, cjson.encode({reason = 'step ' .. child .. ' fired first'}))
          redis.call('HINCRBY', run, 'remaining', -1)
          cancelled[#cancelled + 1] = parent
          cancelled[#cancelled + 1] = (st == 'running' or st == 'queued') and (row[2] or '') or ''
          if st == 'running' and row[3] and row[3] ~= '' then
            cancelled[#cancelled + 1] = parent
            cancelled[#cancelled + 1] = row[3]
          end
          for _, pair in ipairs(after[parent] or {}) do release(pair[1], pair[2], 'cancelled') end
        end
      end
    end
  end
end

local out = {'ok', '', #released}
for _, name in ipairs(released) do out[#out + 1] = name end
out[#out + 1] = #cancelled
for _, value in ipairs(cancelled) do out[#out + 1] = value end

if redis.call('HINCRBY', run, 'remaining', -1) == 0 then
  local failures = tonumber(redis.call('HGET', run, 'leaf_failures') or '0')
  local status = failures > 0 and 'failed' or 'succeeded'
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = status
  fields[#fields + 1] = 'finished_at'
  fields[#fields + 1] = now
  local data = ''
  if status == 'failed' then
    local why = redis.call('HMGET', run, 'failure', 'failed_steps')
    -- Built by hand: cjson would encode an empty list as an object.
    data = '{"error":' .. cjson.encode(why[1] or 'run failed') .. ',"failed_steps":' .. (why[2] or '[]') .. '}'
  end
  emit(run, events, now, 'run_' .. status, '', 0, data)
  if status == 'succeeded' then redis.call('DEL', KEYS[3]) end
  out[2] = status
end
if n_keep > 0 and out[2] == '' then
  -- The first `most` released candidates are claimed, in release order; each claim reads what the ones before wrote.
  local most, kept = tonumber(ARGV[19]), {}
  for _, name in ipairs(released) do
    if #kept >= most then break end
    if candidates[name] then kept[#kept + 1] = name end
  end
  out[#out + 1] = #kept
  for _, name in ipairs(kept) do
    local c = candidates[name]
    local pending = {}
    for j = 1, #fields, 2 do pending[fields[j]] = fields[j + 1] end
    local reply = claim_step(run, events, tonumber(t[1]) + tonumber(t[2]) / 1e6, name, gen, c.task,
      tonumber(ARGV[17]), c.parents, c.children, ARGV[18], pending, fields, name == only and early_read or nil)
    if reply[1] == 'ok' and output ~= '' then
      -- This step's own output, which the caller sent: '=' in its place rather than the value back.
      for j, parent in ipairs(c.parents) do
        if parent == step then reply[9 + 2 * j] = '=' end
      end
    end
    out[#out + 1] = name
    out[#out + 1] = #reply
    for _, value in ipairs(reply) do out[#out + 1] = value end
    claimed[name] = reply[1] == 'ok'
  end
end
if covers and #released > 0 then
  local members = {}
  for _, name in ipairs(released) do
    if covers[name] and claimed[name] ~= false then
      members[#members + 1] = claimed[name] and lease_due or grace_due
      members[#members + 1] = ARGV[13] .. '|' .. name .. '|' .. covers[name]
    end
  end
  if #members > 0 then redis.call('ZADD', KEYS[7], unpack(members)) end
end
fields[#fields + 1] = 'seq'
fields[#fields + 1] = _seq
redis.call('HSET', run, unpack(fields))
-- Compacted after the one HSET above, which writes the step's own scratch (its lease, cleared) too.
if out[2] ~= '' then
  ended(run, events, retention)
  -- Read after the compaction, which keeps both (a run id and a workflow name are short values).
  local link = redis.call('HMGET', run, 'parent_run', 'workflow')
  if KEYS[6] then
    redis.call('ZREM', KEYS[5], ARGV[14])
    redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[15], '*', 'run_id', ARGV[13], 'type', 'run_' .. out[2],
      'workflow', link[2] or '')
  end
  out[#out + 1] = link[1] or ''
  out[#out + 1] = link[2] or ''
end
return out
