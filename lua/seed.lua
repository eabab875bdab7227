-- seed.lua: raise sequence counters to at least a floor, never lower them.
--
-- KEYS[1..N]  sequence counters.
-- ARGV[1..N]  the floor of each: the highest sequence the store holds for that timeline.
--
-- Reply: how many counters were created or raised. Error reply, nothing changed, when the
-- numbers of KEYS and ARGV differ or a floor or a counter is not an integer.
--
-- Used after allocate.lua reported missing counters (Redis lost them, or the timelines are
-- new) and after a write found a sequence already taken (a counter behind the store). Taking
-- the maximum makes racing workers agree whatever order they arrive in: a counter only ever
-- moves forward, so no sequence is handed out twice.

if #ARGV ~= #KEYS then
  return redis.error_reply('ERR seed: one floor per counter')
end
local floors, currents = {}, {}
for i = 1, #KEYS do
  floors[i] = tonumber(ARGV[i])
  currents[i] = tonumber(redis.call('GET', KEYS[i]) or '-1')
  if floors[i] == nil or currents[i] == nil then
    return redis.error_reply('ERR seed: floors and counters must be integers')
  end
end

local raised = 0
for i = 1, #KEYS do
  if currents[i] < floors[i] then
    redis.call('SET', KEYS[i], floors[i])
    raised = raised + 1
  end
end
return raised
