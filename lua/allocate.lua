-- allocate.lua: give every timeline of a request a contiguous range of sequences, atomically,
-- and (for an idempotent request) record what was given.
--
-- KEYS[1]     the idempotency record of the message when ARGV[2] is '1'; otherwise the
--             first timeline counter.
-- KEYS[...]   the sequence counter of every timeline the request touches: its history
--             timeline, then each recipient's sync timeline. A counter is a string holding
--             an integer. N may be tens of thousands: KEYS are walked in a loop, and never
--             unpacked more than CHUNK at a time.
-- ARGV[1]     count: how many sequences each timeline receives (a positive integer).
-- ARGV[2]     '1' when KEYS[1] is an idempotency record, '0' when there is none.
-- ARGV[3]     the record's time to live in milliseconds (when ARGV[2] is '1').
-- ARGV[4]     the request's fingerprint, stored at the head of the record.
-- ARGV[5]     the time of the allocation (ms since the epoch), stored next in the record.
--
-- Reply, one of:
--   {'ok', last_1, ..., last_n}   each timeline i now owns (last_i - count + 1) .. last_i; the
--                                  record, if kept, is "<fingerprint>,<time>,<last_1>,...".
--   {'replay', record}            the record already exists: an earlier attempt of the same
--                                  message allocated its sequences. Nothing changed.
--   {'missing', i, j, ...}        counters i, j, ... (1-based among the timelines) do not
--                                  exist: Redis lost them, or the timeline is new. Nothing
--                                  changed; the caller seeds them from the store (seed.lua)
--                                  and calls again.
--   an error reply, nothing changed, when count or the TTL is not a positive integer or a
--                                  counter does not hold an integer; or Redis's refusal of
--                                  the first INCRBY (OOM, READONLY, MISCONF) as it gave it.
--
-- The script runs atomically: concurrent requests never interleave inside a range, and two
-- attempts of one idempotent message never both allocate.


-- count is passed on to INCRBY as the string it came as: a Lua number would be formatted
-- back into a string by every call, which costs a 10,000-key fan-out several milliseconds.
local count = ARGV[1]
if not string.match(count, '^[1-9][0-9]*$') then
  return redis.error_reply('ERR allocate: count must be a positive integer')
end

local first = 1
local recorded = ARGV[2] == '1'
if recorded then
  local ttl = tonumber(ARGV[3])
  if ttl == nil or ttl < 1 or ttl ~= math.floor(ttl) then
    return redis.error_reply('ERR allocate: the record TTL must be a positive integer')
  end
  local record = redis.call('GET', KEYS[1])
  if record then
    return {'replay', record}
  end
  first = 2
end

-- Every counter must exist. EXISTS answers for CHUNK keys per call, much cheaper than a call
-- per key; unpack() of a chunk stays far below Lua's C-stack limit (8000). Only when a chunk
-- lacks a counter are its keys looked at one by one.
local CHUNK = 1000
local missing = {'missing'}
for i = first, #KEYS, CHUNK do
  local j = math.min(i + CHUNK - 1, #KEYS)
  if redis.call('EXISTS', unpack(KEYS, i, j)) ~= j - i + 1 then
    for k = i, j do
      if redis.call('EXISTS', KEYS[k]) == 0 then
        missing[#missing + 1] = k - first + 1
      end
    end
  end
end
if #missing > 1 then
  return missing
end

local reply = {'ok'}
for i = first, #KEYS do
  local last = redis.pcall('INCRBY', KEYS[i], count)
  if type(last) == 'table' then
    -- Undo what this call did, then report why: Redis's own refusal (OOM, READONLY,
    -- MISCONF: it refuses a script's first write only) as Redis gave it, so the log names
    -- the real cause; a counter that does not hold an integer as such.
    for k = first, i - 1 do
      redis.call('DECRBY', KEYS[k], count)
    end
    if not string.find(last.err, 'not an integer', 1, true) then
      return last
    end
    return redis.error_reply('ERR allocate: ' .. KEYS[i] .. ' does not hold an integer')
  end
  reply[i - first + 2] = last
end
if recorded then
  local parts = {ARGV[4], ARGV[5]}
  for i = 2, #reply do
    parts[i + 1] = tostring(reply[i])
  end
  redis.call('SET', KEYS[1], table.concat(parts, ','), 'PX', ARGV[3])
end
return reply
