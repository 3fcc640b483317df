"""The Redis broker's publish script: one atomic step per batch of events.

For each event, in order: answer from its idempotency key if the key is known;
otherwise take the next seq, append the event to its topic's stream (trimmed to the
history size, expiring with the history ttl), record the topic's last seq and ts,
PUBLISH it on the topic's channel and remember the idempotency key with the first
id. The epoch is created when Redis has none (first use, or Redis lost its data),
so ids from before a loss are recognised as unrecoverable. Redis runs a script
alone, with no other command in between, so ids follow publish order and every
node sees a publish whole or not at all.

Topics pushed out by ``max topics`` leave a tombstone (their last seq) so that a
``since`` from before their last event is known to be unrecoverable; past ``max
topics`` tombstones, the newest seq forgotten is kept as one watermark instead.

KEYS: meta, topics by seq, topics by ts, tombstones. ARGV: candidate epoch, history
size, ttl ms, max topics, dedupe window ms, channel prefix, stream prefix, idempotency
key prefix, and the events: one msgpack array of ``[topic, payload head, payload
data, idempotency key or ""]``, so a batch costs the client one argument to pack.
Streams and idempotency keys are named from the topic inside the script, so the
broker needs a standalone Redis (or a primary with replicas), not Redis Cluster.
Returns per event ``{1 new | 0 duplicate, "<id> <ts>"}``.
"""

# The epoch, made when Redis has none (first use, or Redis lost its data); topic
# indexes left from a lost epoch go with it. KEYS as for PUBLISH; ARGV[1] the candidate.
_EPOCH = r"""
local meta, by_seq, by_ts, gone = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', by_seq, by_ts, gone)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0, 'forgotten', 0)
end
"""

# The newest id given out, as {epoch, seq}: the position a new subscription starts at.
POSITION = _EPOCH + r"""
return {epoch, redis.call('HGET', meta, 'seq')}
"""

PUBLISH = _EPOCH + r"""
local size, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_topics, dedupe = tonumber(ARGV[4]), tonumber(ARGV[5])
local channel_prefix, stream_prefix, key_prefix = ARGV[6], ARGV[7], ARGV[8]
local events = cmsgpack.unpack(ARGV[9])

local now = redis.call('TIME')
local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

local function append(stream, seq, payload, prev)
  local id = seq .. '-0'
  local added = redis.pcall('XADD', stream, 'MAXLEN', size, id, 'p', payload, 'v', prev)
  if type(added) == 'table' and added.err then
    -- a stream left from a lost epoch has larger ids: it is history nobody can ask for
    redis.call('DEL', stream)
    redis.call('XADD', stream, 'MAXLEN', size, id, 'p', payload, 'v', prev)
  end
  if ttl > 0 then
    redis.call('PEXPIRE', stream, ttl)
  end
end

local results = {}
local function previous(topic)
  local last = redis.call('ZSCORE', by_seq, topic)
  if last then
    return last
  end
  last = redis.call('ZSCORE', gone, topic)
  if last then
    redis.call('ZREM', gone, topic)
    return last
  end
  return redis.call('HGET', meta, 'forgotten')
end

local function forget_oldest()
  local excess = redis.call('ZCARD', by_seq) - max_topics
  if excess <= 0 then
    return
  end
  local oldest = redis.call('ZPOPMIN', by_seq, excess)
  for j = 1, #oldest, 2 do
    redis.call('DEL', stream_prefix .. oldest[j])
    redis.call('ZREM', by_ts, oldest[j])
    redis.call('ZADD', gone, oldest[j + 1], oldest[j])
  end
  excess = redis.call('ZCARD', gone) - max_topics
  if excess > 0 then
    local dropped = redis.call('ZPOPMIN', gone, excess)
    local forgotten = tonumber(dropped[#dropped])
    if forgotten > tonumber(redis.call('HGET', meta, 'forgotten')) then
      redis.call('HSET', meta, 'forgotten', forgotten)
    end
  end
end

for i, event in ipairs(events) do
  local topic, head, data, idempotency = event[1], event[2], event[3], event[4]
  local stream, key = stream_prefix .. topic, key_prefix .. topic .. ' ' .. idempotency
  local keyed = idempotency ~= '' and dedupe > 0
  local first = keyed and redis.call('GET', key)
  if first then
    results[i] = {0, first}
  else
    local seq = redis.call('HINCRBY', meta, 'seq', 1)
    local id = epoch .. '-' .. seq
    local prev = previous(topic)
    local payload = head .. cmsgpack.pack(id) .. cmsgpack.pack(ts) .. data
    if size > 0 then
      append(stream, seq, payload, prev)
      redis.call('ZADD', by_ts, ts, topic)
    end
    redis.call('ZADD', by_seq, seq, topic)
    redis.call('PUBLISH', channel_prefix .. topic, payload)
    local outcome = id .. ' ' .. ts
    if keyed then
      redis.call('SET', key, outcome, 'PX', dedupe)
    end
    results[i] = {1, outcome}
  end
end

if ttl > 0 then
  redis.call('ZREMRANGEBYSCORE', by_ts, '-inf', '(' .. (ts - ttl))
end
forget_oldest()
return results
"""
