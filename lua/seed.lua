-- seed.lua: raise sequence counters to at least a floor, never lower them.
--
-- KEYS[1..N]  sequence counters.
-- ARGV[1..N]  the floor of each: the highest sequence the store holds for that timeline.
--
-- Reply: how many counters were created or raised.
--
-- Used after allocate.lua reported missing counters (Redis lost them, or the timelines are
-- new) and after a write found a sequence already taken (a counter behind the store). Taking
-- the maximum makes racing workers agree whatever order they arrive in: a counter only ever
-- moves forward, so no sequence is handed out twice.

local raised = 0
for i = 1, #KEYS do
  local floor = tonumber(ARGV[i])
  local current = tonumber(redis.call('GET', KEYS[i]) or '-1')
  if current < floor then
    redis.call('SET', KEYS[i], floor)
    raised = raised + 1
  end
end
return raised
