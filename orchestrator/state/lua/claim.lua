-- Claim a step for one attempt: the only way a step starts running (the claim itself is claim_step, in _claim.lua).
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, lease_s, n_parents, parents..., n_children,
-- children..., carrier (optional: the task id of the message whose worker slot runs this step, when it continues
-- locally after its parent; a cancel revokes it too, so a prefork worker interrupts the step).
-- Returns {outcome, ...}:
--   {"ok", attempt, now, errors, inputs, attempt_base, cache_key, force, queued_at, p1_status, p1_output, ...}  run it
-- Attempts are numbered over the run's whole life (a resume does not start over: status, events and error records
-- all show this one number); attempt_base, the count when the generation began, gives the retry policy its own.
--   {"inactive", run_status or "deadline"} | {"stale"} | {"superseded"} | {"busy", "own" or ""} | {"missing"}
--   {"done", step_status, c1_status, c1_task, ...}   a duplicate delivery of a finished step
local run, events = KEYS[1], KEYS[2]
local n_parents = tonumber(ARGV[5])
local n_children = tonumber(ARGV[6 + n_parents])
local parents, children = {}, {}
for i = 1, n_parents do parents[i] = ARGV[5 + i] end
for i = 1, n_children do children[i] = ARGV[6 + n_parents + i] end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local write = {}
local out = claim_step(run, events, now, ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), parents, children,
  ARGV[7 + n_parents + n_children] or '', {}, write)
if #write > 0 then
  write[#write + 1] = 'seq'
  write[#write + 1] = _seq
  redis.call('HSET', run, unpack(write))
end
return out
