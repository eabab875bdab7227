-- release.lua: give back sequence ranges that a request allocated but will never write,
-- where nothing was allocated after them.
--
-- KEYS[1..N]  sequence counters.
-- ARGV[1]     count: how many sequences each range holds (a positive integer).
-- ARGV[1+i]   the last sequence of the range the request holds for KEYS[i].
--
-- Reply: {r_1, ..., r_N}: 1 where the counter still stood at that last sequence and was set
-- back by count (the range is free again: the next allocation hands it out, so the
-- timeline keeps no hole), 0 where it did not (another allocation came after, or the
-- counter is gone: the caller seals the range instead). Error reply, nothing changed, when
-- an argument is not an integer or their number is wrong.
--
-- Used when the store's record of an idempotent message shows that Redis had forgotten it
-- (so the retry allocated anew), and when a request gives up before writing anything.
-- The caller guarantees that nothing was written in the ranges. The compare and the set
-- are one atomic step: no allocation can slip in between.

local count = tonumber(ARGV[1])
if count == nil or count < 1 or count ~= math.floor(count) or #ARGV ~= #KEYS + 1 then
  return redis.error_reply('ERR release: a positive count, then one last sequence per counter')
end
for i = 1, #KEYS do
  if tonumber(ARGV[i + 1]) == nil then
    return redis.error_reply('ERR release: last sequences must be integers')
  end
end
local reply = {}
for i = 1, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current and current == ARGV[i + 1] then
    redis.call('DECRBY', KEYS[i], count)
    reply[i] = 1
  else
    reply[i] = 0
  end
end
return reply
