-- admit.lua: decide every budget of one request at once (GCRA), atomically.
--
-- Algorithm: GCRA (generic cell rate algorithm), the exact form of a token bucket. Each budget
-- keeps one number, its TAT ("theoretical arrival time", ms), in a key that expires by itself
-- when the budget is full again. A budget of L units per P ms has emission interval T = P/L and
-- burst tolerance P: a unit costs T, and a request of cost c fits when TAT' - now <= P, where
-- TAT' = max(TAT, now) + c*T. A request that fails ANY budget consumes NONE (all checks come
-- before any write). Time is Redis' own clock (TIME), so gateways with skewed clocks agree.
--
-- The token cost is decided here too, so that learning needs no extra round trip:
--   reserved = prompt + n * completion, completion = fixed (max_tokens) when given, else the
--   learned average for (key, model) when known, else the model default; capped by the
--   context window left after the prompt.
--
-- KEYS[1]  learned completion length (EWMA, a float string) for this key and model
-- KEYS[2]  concurrency lease set (ZSET member = request id, score = lease expiry ms)
-- KEYS[3..] one TAT key per budget, in the order of the budget triples in ARGV
--
-- ARGV[1]  prompt tokens (estimate)          ARGV[2]  fixed completion per choice, -1 if none
-- ARGV[3]  default completion per choice     ARGV[4]  completion cap per choice (context left)
-- ARGV[5]  n (choices)                       ARGV[6]  concurrency cap, 0 = none
-- ARGV[7]  request id                        ARGV[8]  lease ms (a crashed gateway's slot frees)
-- ARGV[9]  number of budgets B
-- ARGV[10..] B triples: limit (units per period), period ms, kind (0 = requests, 1 = tokens)
--
-- Returns {allowed, reserved_tokens, concurrency_ok, learned_used,
--          then per budget: remaining, reset_ms, retry_ms}
--   allowed 1/0; retry_ms = ms until this budget admits the request (0 when it does now,
--   -1 when it never can: cost above the limit); reset_ms = ms until the budget is full.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local prompt = tonumber(ARGV[1])
local fixed = tonumber(ARGV[2])
local default = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local conc_cap = tonumber(ARGV[6])
local request_id = ARGV[7]
local lease_ms = tonumber(ARGV[8])
local nb = tonumber(ARGV[9])

local learned_used = 0
local per_choice = fixed
if per_choice < 0 then
  local learned = redis.call('GET', KEYS[1])
  if learned then
    per_choice = math.ceil(tonumber(learned))
    learned_used = 1
  else
    per_choice = default
  end
end
if per_choice > cap then per_choice = cap end
if per_choice < 0 then per_choice = 0 end
local reserved = prompt + n * per_choice

local allowed = 1
local conc_ok = 1
if conc_cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc_cap then
    conc_ok = 0
    allowed = 0
  end
end

local out = {}
local new_tats = {}
for i = 1, nb do
  local limit = tonumber(ARGV[7 + 3 * i])
  local period = tonumber(ARGV[8 + 3 * i])
  local kind = tonumber(ARGV[9 + 3 * i])
  local cost = 1
  if kind == 1 then cost = reserved end
  local interval = period / limit
  local tat = tonumber(redis.call('GET', KEYS[2 + i]) or now)
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  local remaining, reset, retry
  if cost > limit then
    retry = -1
    remaining = math.floor((period - (tat - now)) / interval)
    reset = tat - now
    allowed = 0
  elseif new_tat - now > period then
    retry = new_tat - now - period
    remaining = math.floor((period - (tat - now)) / interval)
    reset = tat - now
    allowed = 0
  else
    retry = 0
    remaining = math.floor((period - (new_tat - now)) / interval)
    reset = new_tat - now
  end
  new_tats[i] = new_tat
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset)
  out[#out + 1] = math.ceil(retry)
end

if allowed == 1 then
  for i = 1, nb do
    local ttl = math.ceil(new_tats[i] - now) + 1000
    redis.call('SET', KEYS[2 + i], tostring(new_tats[i]), 'PX', ttl)
  end
  if conc_cap > 0 then
    redis.call('ZADD', KEYS[2], now + lease_ms, request_id)
    redis.call('PEXPIRE', KEYS[2], lease_ms)
  end
end

local head = {allowed, reserved, conc_ok, learned_used}
for _, v in ipairs(out) do head[#head + 1] = v end
return head
