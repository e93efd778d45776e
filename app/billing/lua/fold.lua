-- fold.lua: fold a batch of usage events into billing totals, each event at most once.
--
-- All billing keys share the hash tag {bill} (one Redis Cluster slot), so the keys built here
-- from Redis' own clock live on the slot of KEYS[1]. The window is chosen by Redis' clock at
-- fold time, not by the event's time: a window is closed once that clock has passed its end,
-- so no late event can ever land in a window already sent to Stripe.
--
-- KEYS[1]  sy:{bill}:windows   ZSET of window starts (s) that hold unsent totals
-- ARGV[1]  window length, s    ARGV[2]  dedup horizon, s (how long an event id is remembered)
-- ARGV[3..] events, 8 fields each:
--           request id, customer, key id, model, input meter, output meter,
--           prompt tokens, completion tokens
--
-- Per event not seen before (SADD on the current and previous dedup buckets):
--   HINCRBY sy:{bill}:w:<start>:totals  "<customer>\t<meter>"  tokens   (what Stripe gets)
--   HINCRBY sy:{bill}:recorded          "<customer>\t<meter>"  tokens   (for reconciliation)
--   HINCRBY sy:{bill}:day:<days since epoch>:key:<key id> "<model>\t{prompt,completion,requests}"
--   HINCRBY sy:{bill}:day:<days since epoch>:cus:<customer> (the same fields)
-- Returns {folded, duplicates, window start}.

local t = redis.call('TIME')
local now = tonumber(t[1])
local window = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local start = now - (now % window)
local totals = 'sy:{bill}:w:' .. start .. ':totals'
local bucket = now - (now % horizon)
local seen_now = 'sy:{bill}:seen:' .. bucket
local seen_before = 'sy:{bill}:seen:' .. (bucket - horizon)
local days = math.floor(now / 86400)

-- Sums are gathered in Lua tables first and written once per (hash, field) of the batch.
local sums = {}
local function add(hash, fld, n)
  if n == 0 then return end
  local h = sums[hash]
  if not h then h = {}; sums[hash] = h end
  h[fld] = (h[fld] or 0) + n
end

local folded, duplicates = 0, 0
for i = 3, #ARGV, 8 do
  local rid = ARGV[i]
  if redis.call('SISMEMBER', seen_before, rid) == 1 or redis.call('SADD', seen_now, rid) == 0 then
    duplicates = duplicates + 1
  else
    local customer, key, model = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    local meter_in, meter_out = ARGV[i + 4], ARGV[i + 5]
    local pt, ct = tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
    add(totals, customer .. '\t' .. meter_in, pt)
    add(totals, customer .. '\t' .. meter_out, ct)
    add('sy:{bill}:recorded', customer .. '\t' .. meter_in, pt)
    add('sy:{bill}:recorded', customer .. '\t' .. meter_out, ct)
    for _, scope in ipairs({'key:' .. key, 'cus:' .. customer}) do
      local h = 'sy:{bill}:day:' .. days .. ':' .. scope
      add(h, model .. '\tprompt', pt)
      add(h, model .. '\tcompletion', ct)
      add(h, model .. '\trequests', 1)
    end
    folded = folded + 1
  end
end
for hash, fields in pairs(sums) do
  for fld, n in pairs(fields) do
    redis.call('HINCRBY', hash, fld, n)
  end
  if string.sub(hash, 1, 14) == 'sy:{bill}:day:' then
    redis.call('EXPIRE', hash, 400 * 86400)
  end
end
redis.call('EXPIRE', seen_now, 2 * horizon + 60)
if folded > 0 then
  redis.call('ZADD', KEYS[1], start, start)
end
return {folded, duplicates, start}
