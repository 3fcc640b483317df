"""The Redis broker's presence scripts: each one atomic step, timed by Redis's clock.

Keys (``P`` is ``squall:presence:``; a name is a topic or a pattern, in braces, which
no name can contain, so keys never collide and, on a cluster, each name's keys would
share one slot):

- ``P{name}:node:<node id>``: hash, client id -> entry JSON, of one node's clients
- ``P{name}:nodes``: zset, node id -> until when (ms) its entries count as live
- ``P{name}:life``: ``occupied`` or ``vacating`` (absent: vacant)
- ``Pnodes``: zset, node id -> until when (ms) the node counts as alive (heartbeats)
- ``Pnames:<node id>``: set of the names that node has entries in (for its reaper)
- ``Pvacating``: zset, name -> when (ms) its debounce ends (any node may finish it)
- ``Preap:<node id>``: the lock of the node cleaning up after a dead one

Every key expires ``keep`` ms (twice the presence ttl) after its last write unless a
node refreshes it, so the state of nodes that are all gone disappears on its own.
Names are built inside the scripts (as in redis_lua.py): a Redis Cluster needs the
scripts split by slot, each name's part atomic on its own (see the module of the
broker).

Lifecycle, per name (``weigh``): occupied when some live node has an entry; a name
that becomes occupied while vacant is ``occupied`` (signal), while ``vacating`` is
back (no signal); one left without live entries while occupied is ``vacating`` until
its debounce ends (then ``vacated``, by whichever node finishes it first), or
``vacated`` at once after a dead node's clean-up or with no debounce.
"""

_NOW = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# ``weigh(name, base, at_once)``: the name's lifecycle after a change; returns the
# decision (``occupied``, ``vacating``, ``vacated``) or nil. Needs prefix, keep,
# debounce and now.
_WEIGH = r"""
local vacating = prefix .. 'vacating'
local function weigh(name, base, at_once)
  local life = base .. 'life'
  local occupied = redis.call('ZCOUNT', base .. 'nodes', now, '+inf') > 0
  local state = redis.call('GET', life)
  if occupied then
    if state == 'occupied' then
      return nil
    end
    redis.call('SET', life, 'occupied', 'PX', keep + debounce)
    if state then
      redis.call('ZREM', vacating, name)
      return nil
    end
    return 'occupied'
  end
  if state ~= 'occupied' then
    return nil
  end
  if at_once or debounce <= 0 then
    redis.call('DEL', life)
    return 'vacated'
  end
  redis.call('SET', life, 'vacating', 'PX', keep + debounce)
  redis.call('ZADD', vacating, now + debounce, name)
  redis.call('PEXPIRE', vacating, keep + debounce)
  return 'vacating'
end
"""

# ARGV: node id, keep ms, alive ms, debounce ms, key prefix, channel prefix, and one
# msgpack array of ``[name, announce 0|1, [[client id, entry JSON or ""], ...]]``.
# An entry adds or replaces the client's; "" removes it. Joins and leaves of an
# announced name go out on its channel as one ``["presence", name, [[kind, entry]]]``.
# Returns ``{name, decision, ...}`` for the names whose lifecycle changed.
APPLY = _NOW + r"""
local node, keep, alive, debounce = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local prefix, channel_prefix = ARGV[5], ARGV[6]
local groups = cmsgpack.unpack(ARGV[7])
""" + _WEIGH + r"""
local names = prefix .. 'names:' .. node
redis.call('ZADD', prefix .. 'nodes', now + alive, node)
redis.call('PEXPIRE', prefix .. 'nodes', keep)
local decisions = {}
for _, group in ipairs(groups) do
  local name, announce, changes = group[1], group[2], group[3]
  local base = prefix .. '{' .. name .. '}:'
  local hash, nodes = base .. 'node:' .. node, base .. 'nodes'
  local notices = {}
  for _, change in ipairs(changes) do
    local client, entry = change[1], change[2]
    if entry == '' then
      local old = redis.call('HGET', hash, client)
      if old then
        redis.call('HDEL', hash, client)
        notices[#notices + 1] = {'leave', old}
      end
    elseif redis.call('HSET', hash, client, entry) == 1 then
      notices[#notices + 1] = {'join', entry}
    end
  end
  if redis.call('EXISTS', hash) == 1 then
    redis.call('PEXPIRE', hash, keep)
    redis.call('ZADD', nodes, now + alive, node)
    redis.call('PEXPIRE', nodes, keep)
    redis.call('SADD', names, name)
  else
    redis.call('ZREM', nodes, node)
    redis.call('SREM', names, name)
  end
  if announce == 1 and #notices > 0 then
    redis.call('PUBLISH', channel_prefix .. name, cmsgpack.pack({'presence', name, notices}))
  end
  local decision = weigh(name, base, false)
  if decision then
    decisions[#decisions + 1] = name
    decisions[#decisions + 1] = decision
  end
end
redis.call('PEXPIRE', names, keep)
return decisions
"""

# ARGV: node id, keep ms, alive ms, key prefix, then the names the node has clients
# in. Keeps the node alive and its entries live; returns the names whose entries of
# this node are gone (a survivor took the node for dead, or they expired), which the
# node then writes again.
REFRESH = _NOW + r"""
local node, keep, alive, prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local names = prefix .. 'names:' .. node
redis.call('ZADD', prefix .. 'nodes', now + alive, node)
redis.call('PEXPIRE', prefix .. 'nodes', keep)
local lost = {}
for i = 5, #ARGV do
  local name = ARGV[i]
  local base = prefix .. '{' .. name .. '}:'
  local hash = base .. 'node:' .. node
  if redis.call('PEXPIRE', hash, keep) == 1 then
    redis.call('ZADD', base .. 'nodes', now + alive, node)
    redis.call('PEXPIRE', base .. 'nodes', keep)
    redis.call('PEXPIRE', base .. 'life', 2 * keep)
    redis.call('SADD', names, name)
  else
    lost[#lost + 1] = name
  end
end
redis.call('PEXPIRE', names, keep)
return lost
"""

# ARGV: key prefix, most results. Returns ``{dead nodes, names whose debounce ended}``.
SWEEP = _NOW + r"""
local prefix, most = ARGV[1], tonumber(ARGV[2])
return {
  redis.call('ZRANGEBYSCORE', prefix .. 'nodes', '-inf', '(' .. now, 'LIMIT', 0, most),
  redis.call('ZRANGEBYSCORE', prefix .. 'vacating', '-inf', now, 'LIMIT', 0, most)
}
"""

# ARGV: dead node id, keep ms, key prefix, channel prefix, msgpack ``[[name, announce
# 0|1], ...]``. Removes the dead node's entries of each name (announced as leaves)
# and weighs the name, vacating it at once when it is left empty. Idempotent.
# Returns ``{name, decision, ...}``.
REAP = _NOW + r"""
local dead, keep, prefix, channel_prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local debounce = 0
local names = prefix .. 'names:' .. dead
""" + _WEIGH + r"""
local decisions = {}
for _, item in ipairs(cmsgpack.unpack(ARGV[5])) do
  local name, announce = item[1], item[2]
  local base = prefix .. '{' .. name .. '}:'
  local hash = base .. 'node:' .. dead
  local fields = redis.call('HGETALL', hash)
  if #fields > 0 then
    redis.call('DEL', hash)
    if announce == 1 then
      local notices = {}
      for i = 2, #fields, 2 do
        notices[#notices + 1] = {'leave', fields[i]}
      end
      redis.call('PUBLISH', channel_prefix .. name, cmsgpack.pack({'presence', name, notices}))
    end
  end
  redis.call('ZREM', base .. 'nodes', dead)
  redis.call('SREM', names, name)
  local decision = weigh(name, base, true)
  if decision then
    decisions[#decisions + 1] = name
    decisions[#decisions + 1] = decision
  end
end
return decisions
"""

# ARGV: keep ms, key prefix, then names whose debounce may have ended. Vacates each
# that is still vacating, past its deadline and without live entries. Returns
# ``{vacated names, {name, ms left, ...} for those not due yet}``.
VACATE = _NOW + r"""
local keep, prefix = tonumber(ARGV[1]), ARGV[2]
local vacating = prefix .. 'vacating'
local vacated, waiting = {}, {}
for i = 3, #ARGV do
  local name = ARGV[i]
  local base = prefix .. '{' .. name .. '}:'
  local life = base .. 'life'
  local deadline = tonumber(redis.call('ZSCORE', vacating, name) or '0')
  if redis.call('GET', life) ~= 'vacating' then
    redis.call('ZREM', vacating, name)
  elseif deadline > now then
    waiting[#waiting + 1] = name
    waiting[#waiting + 1] = deadline - now
  elseif redis.call('ZCOUNT', base .. 'nodes', now, '+inf') > 0 then
    redis.call('SET', life, 'occupied', 'PX', keep)
    redis.call('ZREM', vacating, name)
  else
    redis.call('DEL', life)
    redis.call('ZREM', vacating, name)
    vacated[#vacated + 1] = name
  end
end
return {vacated, waiting}
"""

# ARGV: the name's key base, most entries. Returns ``{count, {entry JSON, ...}}`` over
# the live nodes' entries, at most ``most`` of them.
LIST = _NOW + r"""
local base, most = ARGV[1], tonumber(ARGV[2])
local count, shown = 0, {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', base .. 'nodes', now, '+inf')) do
  local hash = base .. 'node:' .. node
  count = count + redis.call('HLEN', hash)
  local cursor = '0'
  while #shown < most do
    local page = redis.call('HSCAN', hash, cursor, 'COUNT', most)
    cursor = page[1]
    local fields = page[2]
    for i = 2, #fields, 2 do
      if #shown < most then
        shown[#shown + 1] = fields[i]
      end
    end
    if cursor == '0' then
      break
    end
  end
end
return {count, shown}
"""
