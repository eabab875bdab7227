-- reallocate.lua: give new sequences to the timelines of a message whose sequence turned out
-- to be taken by another message, and keep the message's idempotency record in step.
--
-- KEYS[1]     the idempotency record when ARGV[2] is '1'; otherwise the first counter.
-- KEYS[...]   the counters of the timelines to move.
-- ARGV[1]     count: sequences per timeline, as in allocate.lua.
-- ARGV[2]     '1' when KEYS[1] is an idempotency record, '0' when there is none.
-- ARGV[3...]  for each timeline to move, two values: its position in the record (1-based
--             among the message's timelines) and the last sequence the caller holds for it.
--
-- Reply: {last_1, ..., last_n}, the last sequence each timeline owns now. Where the record
-- already holds another value than the caller's, an earlier attempt moved that timeline:
-- its value is returned and nothing is allocated, so racing attempts agree on one sequence.
-- Without a record, each timeline simply gets a new range.

local count = tonumber(ARGV[1])
local recorded = ARGV[2] == '1'
local first = recorded and 2 or 1

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
  local position = tonumber(ARGV[1 + 2 * k]) + 1  -- +1: the fingerprint leads the record
  local held = ARGV[2 + 2 * k]
  if fields and fields[position] and fields[position] ~= held then
    reply[k] = tonumber(fields[position])
  else
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
