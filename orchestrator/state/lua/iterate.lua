-- Checkpoint a finished iteration of a repeated step: the attempt that ran it must still own the step, as for finish.
-- KEYS[1] run hash, KEYS[2] its event stream. ARGV: step, generation, task_id, iteration, until_met ('1' or ''),
-- result key, generation of the checkpoint, output_json.
-- Returns 1 when recorded, 0 when the attempt is stale (another generation, not running, or another task id).
local run, events = KEYS[1], KEYS[2]
local step, gen, task, iteration, met = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local p = 's:' .. step .. ':'
local head = redis.call('HMGET', run, 'gen', p .. 'status', p .. 'task', p .. 'attempts', 'seq')
if head[1] ~= gen or head[2] ~= 'running' or head[3] ~= task then return 0 end
events_from(head[5])
local t = redis.call('TIME')
local now = string.format('%.6f', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('HSET', run, p .. 'iterations', iteration, p .. 'until_met', met, p .. 'loop_key', ARGV[6],
  p .. 'loop_gen', ARGV[7], p .. 'loop_output', ARGV[8])
emit(run, events, now, 'step_iteration', step, tonumber(head[4]) or 0,
  '{"iteration":' .. iteration .. ',"until_met":' .. (met == '1' and 'true' or 'false') .. '}')
emitted(run)
return 1
