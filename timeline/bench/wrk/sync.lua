-- wrk script: GET /timeline/sync of 20 entries, for the 30 users send.lua writes to.
-- Used by `make bench` (timeline/bench/suite.py) beside timeline-bench.
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", string.format("/timeline/sync?member=u%d&last_read=0&count=20", counter % 30))
end
