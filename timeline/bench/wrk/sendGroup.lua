-- wrk script: POST /timeline/sendGroup to the same 50 members, one group per wrk thread,
-- each message with a client_msg_id of its own: what timeline-bench's sendGroup scenario
-- (--group-size 50) sends. Used by `make bench` (timeline/bench/suite.py).
--
-- Ids are unique across threads and runs (see send.lua); `prefix` is a global for
-- thread:set.
prefix = ""
local counter = 0
local members = {}
for i = 0, 49 do
  members[#members + 1] = string.format('"m%d"', i)
end
local list = table.concat(members, ",")
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
setup = function(thread)
  thread:set("prefix", string.format("w%d-%d-", os.time(), math.random(1, 1000000000)))
end
request = function()
  counter = counter + 1
  local body = string.format(
    '{"group_name":"%sg","group_members":[%s],"message":{"id":"%s%d"},"client_msg_id":"%s%d"}',
    prefix, list, prefix, counter, prefix, counter)
  return wrk.format("POST", "/timeline/sendGroup", {["Content-Type"] = "application/json"}, body)
end
