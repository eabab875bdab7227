-- allocate.lua: give several timelines a contiguous range of sequences each, atomically.
--
-- KEYS[1..N]  the sequence counter of every timeline the request touches: one history
--             timeline and the sync timeline of every recipient. A counter is a string
--             holding an integer; a missing counter counts as 0. N may be tens of
--             thousands: the keys are walked in a loop, never unpacked onto the stack.
-- ARGV[1]     count: how many sequences each timeline receives (a positive integer;
--             1 for one message, the batch size for a batch).
--
-- Reply: an array of N integers; the i-th is the last sequence given to KEYS[i], so
--        KEYS[i] owns (reply[i] - count + 1) .. reply[i]. Error reply, with nothing
--        changed, when count is not a positive integer.
--
-- The script runs atomically, so concurrent requests never interleave inside a range and
-- every timeline stays strictly increasing and contiguous.

local count = tonumber(ARGV[1])
if count == nil or count < 1 or count ~= math.floor(count) then
  return redis.error_reply('ERR allocate: count must be a positive integer')
end

local last = {}
for i = 1, #KEYS do
  last[i] = redis.call('INCRBY', KEYS[i], count)
end
return last
