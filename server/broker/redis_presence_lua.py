"""The Redis broker's presence scripts: each one atomic step, timed by Redis's clock.

Keys (``P`` is ``squall:presence:`` on a single Redis; a name is a topic or a
pattern, in braces, which no name can contain, so keys never collide):

- ``P{name}:node:<node id>``: hash, client id -> entry JSON, of one node's clients
- ``P{name}:nodes``: zset, node id -> until when (ms) its entries count as live
- ``P{name}:life``: ``occupied`` or ``vacating`` (absent: vacant)
- ``Pnodes``: zset, node id -> until when (ms) the node counts as alive (heartbeats)
- ``Pnames:<node id>``: set of the names that node has entries in (for its reaper)
- ``Pvacating``: zset, name -> when (ms) its debounce ends (any node may finish it)
- ``Preap:<node id>``: the lock of the node cleaning up after a dead one

Every key expires ``keep`` ms (twice the presence ttl) after its last write unless a
node refreshes it, so the state of nodes that are all gone disappears on its own.
Every key a script touches is passed in KEYS (none is built inside Lua). On a Redis
Cluster ``P`` is ``squall:{presence}:``: its hash tag puts every presence key in one
slot, so that each script stays one atomic step there; a name's keys keep their
braces after it, which Redis ignores (the first pair decides the slot).

Joins and leaves of an announced name go out as one ``["presence", name, [[kind,
entry], ...]]``: published on the name's own channel (``channel prefix`` + name) on
a single Redis, so that they keep their order with its events; on a cluster, on the
one sharded ``notices`` channel of the presence slot, which every node subscribes
(``SPUBLISH`` from a script must stay in its slot).

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

# ``announce(name, notices)``: needs channel_prefix and notices_channel ("" on a single
# Redis: the name's own channel).
_ANNOUNCE = r"""
local function announce(name, notices)
  local message = cmsgpack.pack({'presence', name, notices})
  if notices_channel == '' then
    redis.call('PUBLISH', channel_prefix .. name, message)
  else
    redis.call('SPUBLISH', notices_channel, message)
  end
end
"""

# ``weigh(name, nodes, life, at_once)``: the name's lifecycle after a change, from its
# ``nodes`` and ``life`` keys; returns the decision (``occupied``, ``vacating``,
# ``vacated``) or nil. Needs vacating (the key), keep, debounce and now.
_WEIGH = r"""
local function weigh(name, nodes, life, at_once)
  local occupied = redis.call('ZCOUNT', nodes, now, '+inf') > 0
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

# KEYS: ``Pnodes``, ``Pnames:<node>``, ``Pvacating``, then for each group of ARGV the
# name's ``node:<node>``, ``nodes`` and ``life`` keys. ARGV: node id, keep ms, alive
# ms, debounce ms, channel prefix, notices channel, and one msgpack array of
# ``[name, announce 0|1, [[client id, entry JSON or ""], ...]]``. An entry adds or
# replaces the client's; "" removes it; the joins and leaves of an announced name
# are announced. Returns ``{name, decision, ...}`` for the names whose lifecycle changed.
APPLY = _NOW + r"""
local node, keep, alive, debounce = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]),
  tonumber(ARGV[4])
local channel_prefix, notices_channel = ARGV[5], ARGV[6]
local groups = cmsgpack.unpack(ARGV[7])
local live, names, vacating = KEYS[1], KEYS[2], KEYS[3]
""" + _WEIGH + _ANNOUNCE + r"""
redis.call('ZADD', live, now + alive, node)
redis.call('PEXPIRE', live, keep)
local decisions = {}
for i, group in ipairs(groups) do
  local name, wanted, changes = group[1], group[2], group[3]
  local hash, nodes, life = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
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
  if wanted == 1 and #notices > 0 then
    announce(name, notices)
  end
  local decision = weigh(name, nodes, life, false)
  if decision then
    decisions[#decisions + 1] = name
    decisions[#decisions + 1] = decision
  end
end
redis.call('PEXPIRE', names, keep)
return decisions
"""

# KEYS: ``Pnodes``, ``Pnames:<node>``, then for each name of ARGV its ``node:<node>``,
# ``nodes`` and ``life`` keys. ARGV: node id, keep ms, alive ms, then the names the
# node has clients in. Keeps the node alive and its entries live; returns the names
# whose entries of this node are gone (a survivor took the node for dead, or they
# expired), which the node then writes again.
REFRESH = _NOW + r"""
local node, keep, alive = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local live, names = KEYS[1], KEYS[2]
redis.call('ZADD', live, now + alive, node)
redis.call('PEXPIRE', live, keep)
local lost = {}
for i = 4, #ARGV do
  local name = ARGV[i]
  local at = 3 * (i - 4) + 3
  local hash, nodes, life = KEYS[at], KEYS[at + 1], KEYS[at + 2]
  if redis.call('PEXPIRE', hash, keep) == 1 then
    redis.call('ZADD', nodes, now + alive, node)
    redis.call('PEXPIRE', nodes, keep)
    redis.call('PEXPIRE', life, 2 * keep)
    redis.call('SADD', names, name)
  else
    lost[#lost + 1] = name
  end
end
redis.call('PEXPIRE', names, keep)
return lost
"""

# KEYS: ``Pnodes``, ``Pvacating``. ARGV: most results. Returns ``{dead nodes, names
# whose debounce ended}``.
SWEEP = _NOW + r"""
local most = tonumber(ARGV[1])
return {
  redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, most),
  redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, most)
}
"""

# KEYS: ``Pnames:<dead node>``, ``Pvacating``, then for each name of ARGV its
# ``node:<dead node>``, ``nodes`` and ``life`` keys. ARGV: dead node id, keep ms,
# channel prefix, notices channel, msgpack ``[[name, announce 0|1], ...]``. Removes
# the dead node's entries of each name (announced as leaves) and weighs the name,
# vacating it at once when it is left empty. Idempotent. Returns ``{name, decision, ...}``.
REAP = _NOW + r"""
local dead, keep = ARGV[1], tonumber(ARGV[2])
local channel_prefix, notices_channel = ARGV[3], ARGV[4]
local names, vacating = KEYS[1], KEYS[2]
local debounce = 0
""" + _WEIGH + _ANNOUNCE + r"""
local decisions = {}
for i, item in ipairs(cmsgpack.unpack(ARGV[5])) do
  local name, wanted = item[1], item[2]
  local hash, nodes, life = KEYS[3 * i], KEYS[3 * i + 1], KEYS[3 * i + 2]
  local fields = redis.call('HGETALL', hash)
  if #fields > 0 then
    redis.call('DEL', hash)
    if wanted == 1 then
      local notices = {}
      for f = 2, #fields, 2 do
        notices[#notices + 1] = {'leave', fields[f]}
      end
      announce(name, notices)
    end
  end
  redis.call('ZREM', nodes, dead)
  redis.call('SREM', names, name)
  local decision = weigh(name, nodes, life, true)
  if decision then
    decisions[#decisions + 1] = name
    decisions[#decisions + 1] = decision
  end
end
return decisions
"""

# KEYS: ``Pvacating``, then for each name of ARGV its ``nodes`` and ``life`` keys.
# ARGV: keep ms, then names whose debounce may have ended. Vacates each that is still
# vacating, past its deadline and without live entries. Returns ``{vacated names,
# {name, ms left, ...} for those not due yet}``.
VACATE = _NOW + r"""
local keep = tonumber(ARGV[1])
local vacating = KEYS[1]
local vacated, waiting = {}, {}
for i = 2, #ARGV do
  local name = ARGV[i]
  local nodes, life = KEYS[2 * i - 2], KEYS[2 * i - 1]
  local deadline = tonumber(redis.call('ZSCORE', vacating, name) or '0')
  if redis.call('GET', life) ~= 'vacating' then
    redis.call('ZREM', vacating, name)
  elseif deadline > now then
    waiting[#waiting + 1] = name
    waiting[#waiting + 1] = deadline - now
  elseif redis.call('ZCOUNT', nodes, now, '+inf') > 0 then
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

# KEYS: a name's ``nodes``. Returns the nodes whose entries of it are live.
LIVE = _NOW + r"""
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""

# KEYS: the ``node:<node>`` hashes of one name. ARGV: most entries. Returns ``{count,
# {entry JSON, ...}}`` over them, at most ``most`` entries.
LIST = r"""
local most = tonumber(ARGV[1])
local count, shown = 0, {}
for _, hash in ipairs(KEYS) do
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
