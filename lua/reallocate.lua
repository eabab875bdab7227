-- reallocate.lua: give new sequences to the timelines of a message whose sequence turned out
-- to be taken by another message, and keep the message's idempotency record in step.
--
-- KEYS[1]     the idempotency record when ARGV[2] is '1'; otherwise the first counter.
-- KEYS[...]   the counters of the timelines to move.
-- ARGV[1]     count: sequences per timeline, as in allocate.lua.
-- ARGV[2]     '1' when KEYS[1] is an idempotency record, '0' when there is none.
-- ARGV[3...]  for each timeline to move, three values: its position in the record (1-based
--             among the message's timelines), the last sequence the caller holds for it,
--             and a floor: the highest sequence the store holds for that timeline.
--
-- Reply: {last_1, ..., last_n}, the last sequence each timeline owns now (or an error reply,
-- nothing changed, when an argument or a counter is malformed). A timeline's
-- counter is first raised to its floor (a counter that Redis lost or that lags the store
-- starts over from the store), then advanced by count; both in this one atomic step, so no
-- other writer can slip in between. Where the record already holds another value than the
-- caller's, an earlier attempt of the same message moved that timeline: its value is
-- returned and nothing is allocated, so racing attempts agree on one sequence.

local count = tonumber(ARGV[1])
local recorded = ARGV[2] == '1'
local first = recorded and 2 or 1
local moves = #KEYS - first + 1

-- Everything is checked before anything changes: an error leaves every counter as it was.
if count == nil or count < 1 or count ~= math.floor(count) then
  return redis.error_reply('ERR reallocate: count must be a positive integer')
end
if #ARGV ~= 2 + 3 * moves then
  return redis.error_reply('ERR reallocate: three values (position, held, floor) per counter')
end
for k = 1, moves do
  local value = redis.call('GET', KEYS[first + k - 1])
  if tonumber(ARGV[3 * k]) == nil or tonumber(ARGV[3 * k + 2]) == nil
      or (value and tonumber(value) == nil) then
    return redis.error_reply('ERR reallocate: positions, floors and counters must be integers')
  end
end

local fields = nil
if recorded then
  local record = redis.call('GET', KEYS[1])
  if record then
    fields = {}
    for field in string.gmatch(record, '[^,]+') do
      fields[#fields + 1] = field
    end
  end
end

local reply = {}
for i = first, #KEYS do
  local k = i - first + 1
  local position = tonumber(ARGV[3 * k]) + 2  -- +2: the fingerprint and time lead the record
  local held = ARGV[3 * k + 1]
  local floor = tonumber(ARGV[3 * k + 2])
  if fields and fields[position] and fields[position] ~= held then
    reply[k] = tonumber(fields[position])
  else
    local current = tonumber(redis.call('GET', KEYS[i]) or '0')
    if current < floor then
      redis.call('SET', KEYS[i], floor)
    end
    reply[k] = redis.call('INCRBY', KEYS[i], count)
    if fields then
      fields[position] = tostring(reply[k])
    end
  end
end
if fields then
  redis.call('SET', KEYS[1], table.concat(fields, ','), 'KEEPTTL')
end
return reply
