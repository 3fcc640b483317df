"""The Redis brokers' scripts: one atomic step each, on one id space.

Every key a script touches is passed in KEYS (none is built inside Lua), and every
call touches one space (redis_keys.Space), whose keys share one slot on a cluster:
the same scripts serve a single Redis and Redis Cluster. Each script starts with the
space's meta and topic indexes, ``KEYS[1..4]`` = meta, topics by seq, topics by ts,
tombstones.

The epoch is created when the space has none (first use, or Redis lost its data),
so ids from before a loss are recognised as unrecoverable; topic indexes left from a
lost epoch go with it.

Seqs: ``counted`` spaces (a single Redis) take the next integer. ``clocked`` spaces
(a cluster) take the larger of the next integer and the master's clock in
microseconds, so they still grow by at least one per event, and a replica promoted
after a failover, which may lack the master's last writes, gives out seqs past the
ones that were lost rather than the same ones again (as long as the masters' clocks
agree to within the failover time). Numbers that big lose digits in Lua's default
formatting, so every seq leaves the script through ``fmt``.
"""

_COMMON = r"""
local meta, by_seq, by_ts, gone = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function fmt(n)
  return string.format('%.0f', n)
end
local function made_epoch(candidate)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = candidate
    redis.call('DEL', by_seq, by_ts, gone)
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'forgotten', 0)
  end
  return epoch
end
local function now()
  local time = redis.call('TIME')
  return tonumber(time[1]), tonumber(time[2])
end
"""

# The newest id given out, as {epoch, seq}: the position a new subscription starts at.
# ARGV: candidate epoch.
POSITION = _COMMON + r"""
local epoch = made_epoch(ARGV[1])
return {epoch, redis.call('HGET', meta, 'seq')}
"""

# Publish a batch of events of one space, in order.
#
# For each event: answer from its idempotency key if the key is known; otherwise take
# the next seq, append the event to its topic's stream, send it on its channels and
# remember the idempotency key with the first id. Each topic's last seq and ts, its
# stream's trimming to the history size and its expiry (the history ttl) are done once
# per call, after its events: a batch to one topic costs two commands per event (XADD
# and PUBLISH), not six. (XADD's own exact MAXLEN walks past the entries it deleted
# before, on every add; one XTRIM per call does the same cut at a fraction of the
# cost.) Redis runs a script alone, so ids follow publish order and every node sees a
# publish whole, trimmed, or not at all.
#
# Topics pushed out by ``max topics`` leave a tombstone (their last seq) so that a
# ``since`` from before their last event is known to be unrecoverable; past ``max
# topics`` tombstones, the newest seq forgotten is kept as one watermark instead. Their
# streams are not in KEYS: the script returns the topics, and the broker deletes the
# streams with FORGET; a stream still there when its topic comes back is deleted here.
# In clocked spaces seqs are times, so topics idle longer than ``idle ms`` are
# forgotten too (their streams expired long before), with the cut-off as watermark.
#
# ARGV: [1] candidate epoch, [2] history size, [3] ttl ms, [4] max topics, [5] dedupe
# window ms, [6] 1 for clocked seqs, [7] 1 for sharded channels (SPUBLISH, sent only
# to channels with a subscriber on this node) or 0 (PUBLISH), [8] idle ms after which
# a clocked space forgets a topic (0: never), [9] 1 when the caller will WAIT for
# replicas (then every call writes, so that the WAIT covers whatever the answer rests
# on, even an idempotency key read back), [10] the events: one msgpack array of
# ``[topic, payload head, payload data, stream key index, idempotency key index (0:
# none), [channel key indexes]]``.
# Returns ``{answers, {forgotten topics}}``: the answers are one string, a line per
# event, ``1<id> <ts>`` for a new one and ``0<id> <ts>`` for a duplicate (one string
# is far cheaper for both sides than a table per event).
PUBLISH = _COMMON + r"""
local epoch = made_epoch(ARGV[1])
local size, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_topics, dedupe = tonumber(ARGV[4]), tonumber(ARGV[5])
local clocked, sharded = ARGV[6] == '1', ARGV[7] == '1'
local idle_ms, confirmed = tonumber(ARGV[8]), ARGV[9] == '1'
local events = cmsgpack.unpack(ARGV[10])

local seconds, micros = now()
local ts = seconds * 1000 + math.floor(micros / 1000)
local packed_ts = cmsgpack.pack(ts)
local clock = seconds * 1000000 + micros
local seq = tonumber(redis.call('HGET', meta, 'seq'))

local function next_seq()
  seq = seq + 1
  if clocked and clock > seq then
    seq = clock
  end
  return seq
end

local function append(stream, id, payload, prev)
  local added = redis.pcall('XADD', stream, id, 'p', payload, 'v', prev)
  if type(added) == 'table' and added.err then
    -- a stream left from a lost epoch has larger ids: it is history nobody can ask for
    redis.call('DEL', stream)
    redis.call('XADD', stream, id, 'p', payload, 'v', prev)
  end
end

-- a msgpack string (cmsgpack.pack, by hand for the short ones ids are)
local function packed_string(text)
  if #text < 32 then
    return string.char(0xa0 + #text) .. text
  end
  return cmsgpack.pack(text)
end

local listened = {}
local function send(channel, payload)
  if not sharded then
    redis.call('PUBLISH', channel, payload)
    return
  end
  local heard = listened[channel]
  if heard == nil then
    heard = redis.call('PUBSUB', 'SHARDNUMSUB', channel)[2] > 0
    listened[channel] = heard
  end
  if heard then
    redis.call('SPUBLISH', channel, payload)
  end
end

-- the topics this call published to, in order, with their newest seq and stream; the
-- indexes, trimming and expiries are done once per topic, after the loop
local touched, newest, streams = {}, {}, {}

local function previous(topic, stream)
  local last = newest[topic]
  if last then
    return last
  end
  touched[#touched + 1] = topic
  streams[topic] = stream
  last = redis.call('ZSCORE', by_seq, topic)
  if last then
    return last
  end
  last = redis.call('ZSCORE', gone, topic)
  if last then
    redis.call('ZREM', gone, topic)
    redis.call('DEL', stream)  -- what it kept before it was forgotten
    return last
  end
  return redis.call('HGET', meta, 'forgotten')
end

local function forget_idle()
  if not clocked or idle_ms <= 0 then
    return
  end
  local cutoff = clock - idle_ms * 1000
  if redis.call('ZREMRANGEBYSCORE', by_seq, '-inf', '(' .. fmt(cutoff)) > 0 then
    if cutoff > tonumber(redis.call('HGET', meta, 'forgotten')) then
      redis.call('HSET', meta, 'forgotten', fmt(cutoff))
    end
  end
  redis.call('ZREMRANGEBYSCORE', gone, '-inf', '(' .. fmt(cutoff))
end

local function forget_oldest()
  local excess = redis.call('ZCARD', by_seq) - max_topics
  if excess <= 0 then
    return {}
  end
  local oldest = redis.call('ZPOPMIN', by_seq, excess)
  local forgotten = {}
  for j = 1, #oldest, 2 do
    redis.call('ZREM', by_ts, oldest[j])
    redis.call('ZADD', gone, oldest[j + 1], oldest[j])
    forgotten[#forgotten + 1] = oldest[j]
  end
  excess = redis.call('ZCARD', gone) - max_topics
  if excess > 0 then
    local dropped = redis.call('ZPOPMIN', gone, excess)
    local upto = tonumber(dropped[#dropped])
    if upto > tonumber(redis.call('HGET', meta, 'forgotten')) then
      redis.call('HSET', meta, 'forgotten', fmt(upto))
    end
  end
  return forgotten
end

local results = {}
local published = false
for i, event in ipairs(events) do
  local topic, head, data = event[1], event[2], event[3]
  local stream, key_index, channels = KEYS[event[4]], event[5], event[6]
  local key = key_index > 0 and dedupe > 0 and KEYS[key_index]
  local first = key and redis.call('GET', key)
  if first then
    results[i] = '0' .. first
    if confirmed then
      local left = redis.call('PTTL', key)
      if left > 0 then
        redis.call('PEXPIRE', key, left)
      end
    end
  else
    local id = fmt(next_seq())
    local event_id = epoch .. '-' .. id
    local prev = previous(topic, stream)
    local payload = head .. packed_string(event_id) .. packed_ts .. data
    if size > 0 then
      append(stream, id .. '-0', payload, prev)
    end
    newest[topic] = id
    for _, channel in ipairs(channels) do
      send(KEYS[channel], payload)
    end
    local outcome = event_id .. ' ' .. ts
    if key then
      redis.call('SET', key, outcome, 'PX', dedupe)
    end
    results[i] = '1' .. outcome
    published = true
  end
end

-- ZADD takes this many score-member pairs at a time (Lua's unpack has a limit)
local PAIRS = 2000
local function index_topics(key, score_of)
  for first = 1, #touched, PAIRS do
    local args = {}
    for j = first, math.min(first + PAIRS - 1, #touched) do
      args[#args + 1] = score_of(touched[j])
      args[#args + 1] = touched[j]
    end
    redis.call('ZADD', key, unpack(args))
  end
end

local forgotten = {}
if published then
  index_topics(by_seq, function(topic) return newest[topic] end)
  if size > 0 then
    index_topics(by_ts, function() return ts end)
    for _, topic in ipairs(touched) do
      redis.call('XTRIM', streams[topic], 'MAXLEN', size)
      if ttl > 0 then
        redis.call('PEXPIRE', streams[topic], ttl)
      end
    end
  end
  redis.call('HSET', meta, 'seq', fmt(seq))
  if ttl > 0 then
    redis.call('ZREMRANGEBYSCORE', by_ts, '-inf', '(' .. (ts - ttl))
  end
  forget_idle()
  forgotten = forget_oldest()
end
return {table.concat(results, '\n'), forgotten}
"""

# Delete the streams of forgotten topics, unless a topic came back meanwhile.
# KEYS: tombstones, then the streams; ARGV: their topics, in the same order.
FORGET = r"""
local deleted = 0
for i, topic in ipairs(ARGV) do
  if redis.call('ZSCORE', KEYS[1], topic) then
    deleted = deleted + redis.call('DEL', KEYS[i + 1])
  end
end
return deleted
"""

# What a reader needs with any read, in the same step: {epoch, seq, forgotten} (false
# where the space has none) and the time in ms.
_READ = r"""
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'forgotten')
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# One topic's history: KEYS meta, topics by seq, tombstones, the stream; ARGV topic,
# the first stream id wanted, the most entries. Returns {meta, now ms, entries, the
# topic's last seq or false, its tombstone or false}.
READ_TOPIC = _READ + r"""
local entries = redis.call('XRANGE', KEYS[4], ARGV[2], '+', 'COUNT', ARGV[3])
return {meta, now_ms, entries, redis.call('ZSCORE', KEYS[2], ARGV[1]),
        redis.call('ZSCORE', KEYS[3], ARGV[1])}
"""

# The topics a pattern's history reads: KEYS meta, topics by seq, tombstones; ARGV the
# lowest seq wanted. Returns {meta, now ms, {topic, seq, ...} published since,
# {tombstoned topic, ...} since}.
READ_TOPICS = _READ + r"""
return {meta, now_ms, redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'WITHSCORES'),
        redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], '+inf')}
"""

# Last ids: KEYS meta, topics by seq, topics by ts; ARGV the topics. Returns {meta,
# now ms, {seq or false, ...}, {ts or false, ...}}.
READ_LAST = _READ + r"""
return {meta, now_ms, redis.call('ZMSCORE', KEYS[2], unpack(ARGV)),
        redis.call('ZMSCORE', KEYS[3], unpack(ARGV))}
"""

# Topics with retained events: KEYS topics by ts; ARGV the ttl in ms (0: none).
RETAINED = r"""
local time = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local deadline = '-inf'
if ttl > 0 then
  deadline = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) - ttl
end
return redis.call('ZRANGEBYSCORE', KEYS[1], deadline, '+inf')
"""

# A node's subscriber counts, written anew: KEYS the node's hash, the set of nodes; ARGV
# the node id, the ms the hash lives, then name, count, name, count, ...
COUNTS = r"""
redis.call('DEL', KEYS[1])
if #ARGV > 2 then
  for i = 3, #ARGV, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 1
"""
