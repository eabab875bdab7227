-- wrk script: POST /timeline/sendGroup to 10,000 members ("fan-m0" .. "fan-m9999", group
-- "fan-group"): the fan-out `make bench` also times one request at a time against its floor
-- (timeline/bench/suite.py). Run with one connection: its latency is the figure.
local members = {}
for i = 0, 9999 do
  members[#members + 1] = string.format('"fan-m%d"', i)
end
local body = '{"group_name":"fan-group","group_members":[' .. table.concat(members, ",")
  .. '],"message":{"id":"x"}}'
request = function()
  return wrk.format("POST", "/timeline/sendGroup", {["Content-Type"] = "application/json"}, body)
end
