-- wrk script: POST /timeline/send between two users picked at random among 30 (the 435
-- conversations timeline-bench's send scenario uses), each message with a client_msg_id of
-- its own (as the README tells callers). Used by `make bench` (timeline/bench/suite.py).
--
-- Every id is unique across threads and runs: a repeated client_msg_id would be a retry,
-- answered from its record (a replay), not a new message. `prefix` is a global because
-- setup() hands each thread its own with thread:set, which sets globals only.
prefix = ""
local counter = 0
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
setup = function(thread)
  thread:set("prefix", string.format("w%d-%d-", os.time(), math.random(1, 1000000000)))
end
init = function(args)
  math.randomseed(os.time() + #prefix + math.random(1, 1000000))
end
request = function()
  counter = counter + 1
  local a = math.random(0, 29)
  local b = math.random(0, 28)
  if b >= a then b = b + 1 end
  local body = string.format(
    '{"from":"u%d","to":"u%d","message":{"id":"%s%d"},"client_msg_id":"%s%d"}',
    a, b, prefix, counter, prefix, counter)
  return wrk.format("POST", "/timeline/send", {["Content-Type"] = "application/json"}, body)
end
