-- settle.lua: after a request, correct its token reservation to what was really used.
--
-- delta = actual - reserved tokens. A refund (delta < 0) moves each token budget's TAT back,
-- never before now (unused budget is not banked beyond full); an overrun (delta > 0) moves it
-- forward, so later requests pay for it. Request budgets are not touched: a request counts
-- whatever it used. Releases the concurrency lease and, when the request gave no max_tokens,
-- folds its completion length per choice into the learned average (EWMA).
--
-- KEYS[1]  learned completion length (EWMA) for this key and model
-- KEYS[2]  concurrency lease set
-- KEYS[3..] TAT keys of the TOKEN budgets only
--
-- ARGV[1]  delta tokens (may be negative)     ARGV[2]  request id
-- ARGV[3]  learn: 1 to update the EWMA         ARGV[4]  completion tokens per choice
-- ARGV[5]  EWMA weight of the new sample       ARGV[6]  EWMA key lifetime, seconds
-- ARGV[7..] per token budget: limit, period ms
--
-- Returns the number of budgets adjusted.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local delta = tonumber(ARGV[1])

redis.call('ZREM', KEYS[2], ARGV[2])

if tonumber(ARGV[3]) == 1 then
  local sample = tonumber(ARGV[4])
  local alpha = tonumber(ARGV[5])
  local old = redis.call('GET', KEYS[1])
  local value = sample
  if old then value = alpha * sample + (1 - alpha) * tonumber(old) end
  redis.call('SET', KEYS[1], tostring(value), 'EX', tonumber(ARGV[6]))
end

local adjusted = 0
if delta ~= 0 then
  for i = 3, #KEYS do
    local j = 7 + (i - 3) * 2
    local limit = tonumber(ARGV[j])
    local period = tonumber(ARGV[j + 1])
    local interval = period / limit
    local tat = tonumber(redis.call('GET', KEYS[i]) or now)
    if tat < now then tat = now end
    local new_tat = tat + delta * interval
    if new_tat <= now then
      redis.call('DEL', KEYS[i])
    else
      redis.call('SET', KEYS[i], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
    end
    adjusted = adjusted + 1
  end
end
return adjusted
