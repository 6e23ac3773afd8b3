-- Prepended to every transition script: append events to the run's stream, numbered by the run's "seq" field.
-- Stream entry ids are "0-SEQ", so readers resume after a sequence number with no gaps and no repeats.
local EVENTS_MAXLEN = 10000
local _seq = nil
local function emit(run, events, now, etype, step, attempt, data)
  if not _seq then _seq = tonumber(redis.call('HGET', run, 'seq') or '0') end
  _seq = _seq + 1
  redis.call('XADD', events, 'MAXLEN', '~', EVENTS_MAXLEN, '0-' .. _seq, 'type', etype, 'step', step or '',
    'attempt', tostring(attempt or 0), 'ts', now, 'data', data or '')
end
-- Scripts that already read the run hash pass its "seq" here instead of paying for another HGET.
local function events_from(seq)
  _seq = tonumber(seq) or 0
end
local function emitted(run)
  if _seq then redis.call('HSET', run, 'seq', _seq) end
end
