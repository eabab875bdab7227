-- wrk script: POST /timeline/send among 30 users, each message with a client_msg_id of its
-- own (as the README tells callers). Used by `make bench` (timeline/bench/suite.py).
local counter = 0
local prefix = ""
setup = function(thread)
  thread:set("prefix", string.format("w%d-", math.random(1, 1000000000)))
end
init = function(args)
  math.randomseed(os.time())
end
request = function()
  counter = counter + 1
  local a = counter % 30
  local b = (counter * 7 + 1) % 30
  if a == b then b = (b + 1) % 30 end
  local body = string.format('{"from":"u%d","to":"u%d","message":{"text":"hello %d"},"client_msg_id":"%s%d"}', a, b, counter, prefix, counter)
  return wrk.format("POST", "/timeline/send", {["Content-Type"] = "application/json"}, body)
end
