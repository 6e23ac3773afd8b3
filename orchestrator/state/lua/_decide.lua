-- Prepended (after _events.lua and _items.lua) to decide.lua and item_decide.lua: a decision's clock and its audit
-- trail, shared by a step's and an item's decision.
local function decision_clock()
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
  return clock, string.format('%.6f', clock)
end
-- Append a decision to the trail JSON held in hash field `field` of `key` (its value read by the caller, `trail`),
-- keeping the newest max_audit entries: the oldest refused one goes first, an accepted decision is never pushed out
-- by refusals.
local function audit_decision(key, field, trail, max_audit, entry)
  local audit = cjson.decode(trail ~= false and trail ~= '' and trail or '[]')
  audit[#audit + 1] = entry
  while #audit > max_audit do
    local oldest = 1
    for i = 1, #audit do
      if audit[i].outcome ~= 'accepted' then oldest = i break end
    end
    table.remove(audit, oldest)
  end
  redis.call('HSET', key, field, cjson.encode(audit))
end
-- Whether a run with this status still records decisions (a refused one on an ended run is not kept).
local function run_live(status)
  return status == 'running' or status == 'waiting' or status == 'pending'
end
