/*
 * squall.js: the browser client for Squall's WebSocket API (protocol v1, JSON only).
 *
 * No dependencies and no build step. Load it either way:
 *
 *   <script src="/static/squall.js"></script>          classic script: defines window.Squall
 *   import Squall from "/static/squall.mjs";           ES module: squall.mjs re-exports it
 *
 *   const c = new Squall("/v1/ws", {token, getToken});
 *   const sub = c.subscribe("orders.*", (ev) => render(ev.data));
 *   await c.publish("chat.room1", {text: "hi"});       // resolves with the `published` reply
 *   c.on("recovery_failed", ({topic}) => reloadFromBackend(topic));
 *
 * Guarantees: each subscription sees every event of its topics once, in publish order,
 * across reconnects, as long as the server's history covers the outage (resumed with
 * `since`, or with the `last_id` of its `subscribed` reply when it saw no event yet);
 * when it does not, "recovery_failed" says so, before the events that follow it. A
 * subscribe the server cannot take now (`broker_unavailable`) is retried with backoff.
 * See docs/browser.md.
 */
(function (root) {
  "use strict";

  var PROTOCOL = "squall.v1.json";
  var CLOSE_UNAUTHORIZED = 4001;
  // Close codes after which reconnecting cannot help (protocol.md, Close codes).
  var TERMINAL_CODES = [1000, 1009, 4000, 4003];
  var RECENT_IDS = 1000;
  // Errors a subscribe may get while the server's broker is away: retried with backoff.
  var RETRIED_SUBSCRIBE_ERRORS = ["broker_unavailable"];

  var DEFAULTS = {
    token: null,             // a JWT, sent as ?token=
    getToken: null,          // async ({code, reason}) => fresh JWT, or null to stop
    autoConnect: true,
    backoff: {initial: 500, max: 30000, factor: 2, resetAfter: 5000},
    pingInterval: 20000,     // ms between {"type":"ping"} frames while open (0: none)
    pingTimeout: 10000,      // ms without any frame after a ping before reconnecting
    connectTimeout: 10000,   // ms a handshake may take before reconnecting
    publishTimeout: 15000,   // ms before a publish promise rejects with code "timeout"
    WebSocket: null          // the WebSocket constructor (default: the global one)
  };

  /** An error from the server (an `error` frame) or from the client itself. */
  class SquallError extends Error {
    constructor(code, message, frame) {
      super(message || code);
      this.name = "SquallError";
      this.code = code;
      this.frame = frame || null;
    }
  }

  /** Whether a concrete topic matches a subscription name (`*` one segment, `>` the rest). */
  function topicMatches(pattern, topic) {
    var wanted = pattern.split(".");
    var actual = topic.split(".");
    for (var i = 0; i < wanted.length; i++) {
      if (wanted[i] === ">") return actual.length > i;
      if (i >= actual.length) return false;
      if (wanted[i] !== "*" && wanted[i] !== actual[i]) return false;
    }
    return wanted.length === actual.length;
  }

  /** Reconnect delay for a 0-based attempt: exponential, capped, with equal jitter. */
  function backoffDelay(attempt, backoff, random) {
    var ceiling = Math.min(backoff.max, backoff.initial * Math.pow(backoff.factor, attempt));
    return Math.round(ceiling / 2 + (random || Math.random)() * ceiling / 2);
  }

  function randomKey() {
    var bytes = new Uint8Array(16);
    root.crypto.getRandomValues(bytes);
    return Array.from(bytes, function (b) { return b.toString(16).padStart(2, "0"); }).join("");
  }

  /** User callbacks run here: an exception is reported, never breaks the client. */
  function safely(fn, args) {
    try {
      fn.apply(null, args);
    } catch (error) {
      if (typeof root.reportError === "function") root.reportError(error);
      else console.error(error);
    }
  }

  /** The socket URL: relative URLs resolve against the page, http(s) becomes ws(s). */
  function socketUrl(url, token) {
    var base = root.location ? root.location.href : undefined;
    var resolved = new URL(url || "/v1/ws", base);
    if (resolved.protocol === "http:") resolved.protocol = "ws:";
    if (resolved.protocol === "https:") resolved.protocol = "wss:";
    if (token) resolved.searchParams.set("token", token);
    return resolved.toString();
  }

  function eventKey(event) {
    return event.topic + "\n" + event.id;
  }

  /** The keys of the last RECENT_IDS events seen; `add` says whether a key is new. */
  class RecentKeys {
    constructor() {
      this.keys = new Set();
    }

    add(key) {
      if (this.keys.has(key)) return false;
      this.keys.add(key);
      if (this.keys.size > RECENT_IDS) this.keys.delete(this.keys.values().next().value);
      return true;
    }
  }

  /**
   * One subscribed name on the server, shared by every Subscription to it. Keeps the
   * last event id seen (the `since` of the next resume) and recent ids, so an event
   * replayed to two overlapping subscriptions after a resume reaches each once.
   *
   * While a subscribe with `since` is in flight, matching events are held in `replay`
   * instead of delivered: the server sends this name's replay right before its
   * `subscribed` reply, so the tail of what was held is the replay, in order, and any
   * earlier copy of one of its events (another subscription's replay) is dropped.
   */
  class Entry {
    constructor(topic, since) {
      this.topic = topic;
      this.lastId = since || null;
      this.subscriptions = new Set();
      this.recent = new RecentKeys();
      this.subscribed = false;
      this.replay = null;
      this.retries = 0;  // subscribes answered broker_unavailable in a row
    }

    /** Record `event` as seen; false when it was seen already. */
    accept(event) {
      if (!this.recent.add(eventKey(event))) return false;
      this.lastId = event.id;
      return true;
    }

    /** The held events to deliver once `subscribed` came, in order. */
    takeReplay(recovered) {
      var held = this.replay || [];
      this.replay = null;
      if (!recovered) return held;
      var last = new Map();
      held.forEach(function (event, index) { last.set(eventKey(event), index); });
      return held.filter(function (event, index) { return last.get(eventKey(event)) === index; });
    }
  }

  /** What `subscribe` returns: `unsubscribe()`, `lastId`, and `ready` (a Promise). */
  class Subscription {
    constructor(client, entry, handler, options) {
      this.topic = entry.topic;
      this._client = client;
      this._entry = entry;
      this._handler = handler;
      this._options = options;
      this.active = true;
      var self = this;
      this.ready = new Promise(function (resolve, reject) {
        self._resolve = resolve;
        self._reject = reject;
      });
      this.ready.catch(function () {});  // a rejection is reported through onError too
    }

    /** The id of the last event this subscription saw: where it resumes from. */
    get lastId() {
      return this._entry.lastId;
    }

    unsubscribe() {
      if (!this.active) return;
      this.active = false;
      this._client._drop(this);
    }

    _deliver(event) {
      if (this.active) safely(this._handler, [event, this]);
    }

    _call(name, payload) {
      var callback = this._options[name];
      if (this.active && typeof callback === "function") safely(callback, [payload, this]);
    }
  }

  class Squall {
    /**
     * @param {string} [url] the WebSocket endpoint, e.g. "wss://host/v1/ws"; relative URLs
     *   (the default is "/v1/ws") resolve against the page.
     * @param {object} [options] see DEFAULTS above.
     */
    constructor(url, options) {
      options = options || {};
      this.url = url || "/v1/ws";
      this.options = Object.assign({}, DEFAULTS, options);
      this.options.backoff = Object.assign({}, DEFAULTS.backoff, options.backoff);
      this.token = this.options.token || null;
      this.state = "idle";
      this._listeners = new Map();
      this._entries = new Map();     // subscribed name -> Entry
      this._recent = new RecentKeys(); // for the client-wide "event" listeners
      this._requests = new Map();    // ref -> {kind, frame, ...}
      this._nextRef = 1;
      this._attempt = 0;
      this._socket = null;
      this._timers = {};
      this._generation = 0;          // bumped on every connect and close, to drop stale work
      this._needToken = !this.token && typeof this.options.getToken === "function";
      if (this.options.autoConnect) {
        var self = this;
        // after the caller's first synchronous on()/subscribe() calls
        Promise.resolve().then(function () {
          if (self.state === "idle") self.connect();
        });
      }
    }

    // -- public API ---------------------------------------------------------------

    /** Listen: "state", "open", "close", "event", "subscribed", "recovery_failed", "error". */
    on(name, listener) {
      if (!this._listeners.has(name)) this._listeners.set(name, new Set());
      this._listeners.get(name).add(listener);
      var self = this;
      return function off() { self.off(name, listener); };
    }

    off(name, listener) {
      var listeners = this._listeners.get(name);
      if (listeners) listeners.delete(listener);
    }

    /**
     * Subscribe to a topic or pattern. `handler(event, subscription)` gets every event;
     * options: `since` (resume after this id), `onRecoveryFailed`, `onSubscribed`, `onError`.
     */
    subscribe(topic, handler, options) {
      if (typeof topic !== "string" || typeof handler !== "function") {
        throw new TypeError("subscribe(topic, handler): a topic string and a function");
      }
      var entry = this._entries.get(topic);
      var fresh = !entry;
      if (fresh) {
        entry = new Entry(topic, options && options.since);
        this._entries.set(topic, entry);
      }
      var subscription = new Subscription(this, entry, handler, options || {});
      entry.subscriptions.add(subscription);
      if (!fresh && entry.subscribed) subscription._resolve({topic: topic});
      if (fresh && this._isOpen()) this._sendSubscribe(entry);
      return subscription;
    }

    /** Publish over the socket; resolves with the `published` reply, rejects with SquallError. */
    publish(topic, data, options) {
      options = options || {};
      if (data === undefined) {
        return Promise.reject(new TypeError("publish(topic, data): data must be a JSON value"));
      }
      if (this.state === "closed") {
        return Promise.reject(new SquallError("closed", "the client is closed"));
      }
      var self = this;
      return new Promise(function (resolve, reject) {
        var ref = self._nextRef++;
        // the key makes a resend after a reconnect safe: the server publishes it once
        var frame = {type: "publish", topic: topic, data: data, ref: ref,
                     idempotency_key: options.idempotencyKey || randomKey()};
        var request = {kind: "publish", frame: frame, resolve: resolve, reject: reject};
        var timeout = options.timeout || self.options.publishTimeout;
        request.timer = setTimeout(function () {
          self._settle(ref, new SquallError("timeout", "no reply to the publish in " +
                                             timeout + " ms"));
        }, timeout);
        self._requests.set(ref, request);
        if (self._isOpen()) self._send(frame);
      });
    }

    /** Connect (again): after `close()`, or with `autoConnect: false`. */
    connect() {
      if (this.state === "connecting" || this.state === "open") return;
      this._attempt = 0;
      this._lastClose = null;
      this._connect();
    }

    /** Close for good (until `connect()`); pending publishes reject with code "closed". */
    close() {
      var socket = this._socket;
      this._detach();
      if (socket) {
        socket.close(1000, "client closed");
        this._emit("close", {code: 1000, reason: "client closed", willReconnect: false});
      }
      this._stop(1000, "client closed");
    }

    // -- connecting -------------------------------------------------------------------

    _connect() {
      var generation = ++this._generation;
      this._setState("connecting", {attempt: this._attempt});
      if (!this._needToken) {
        this._openSocket();
        return;
      }
      var self = this;
      var reason = this._lastClose || {code: null, reason: ""};
      Promise.resolve()
        .then(function () { return self.options.getToken(reason); })
        .then(function (token) {
          if (generation !== self._generation) return;
          if (!token) {
            self._stop(reason.code || CLOSE_UNAUTHORIZED, "no token");
            return;
          }
          self.token = token;
          self._needToken = false;
          self._openSocket();
        }, function (error) {
          if (generation !== self._generation) return;
          self._emit("error", error);
          self._retry(reason.code || CLOSE_UNAUTHORIZED, "getToken failed");
        });
    }

    _openSocket() {
      var Socket = this.options.WebSocket || root.WebSocket;
      var socket;
      try {
        socket = new Socket(socketUrl(this.url, this.token), PROTOCOL);
      } catch (error) {
        this._emit("error", error);  // a malformed URL: retrying cannot help
        this._stop(1006, String(error && error.message));
        return;
      }
      var self = this;
      this._socket = socket;
      socket.onopen = function () { self._onOpen(); };
      socket.onmessage = function (message) { self._onMessage(message.data); };
      socket.onclose = function (event) { self._onClose(event.code, event.reason); };
      this._timers.connect = setTimeout(function () {
        self._abandon("connect timeout");
      }, this.options.connectTimeout);
    }

    _onOpen() {
      clearTimeout(this._timers.connect);
      var self = this;
      this._timers.stable = setTimeout(function () {
        self._attempt = 0;
      }, this.options.backoff.resetAfter);
      if (this.options.pingInterval > 0) {
        this._timers.ping = setInterval(function () { self._ping(); }, this.options.pingInterval);
      }
      // everything buffered goes first, in order: subscribes, then publishes
      this._entries.forEach(function (entry) { self._sendSubscribe(entry); });
      this._requests.forEach(function (request) {
        if (request.kind === "publish") self._send(request.frame);
      });
      this._setState("open");
      this._emit("open", {url: this.url});
    }

    _onClose(code, reason) {
      this._detach();
      var unauthorized = code === CLOSE_UNAUTHORIZED;
      var renewable = unauthorized && typeof this.options.getToken === "function";
      var reconnect = renewable || (!unauthorized && TERMINAL_CODES.indexOf(code) < 0);
      this._emit("close", {code: code, reason: reason, willReconnect: reconnect});
      if (!reconnect) {
        this._stop(code, reason);
        return;
      }
      this._needToken = renewable;
      this._retry(code, reason);
    }

    /** Give up on a socket that stopped answering, and reconnect. */
    _abandon(reason) {
      var socket = this._socket;
      this._detach();
      if (socket) socket.close();
      this._emit("close", {code: 1006, reason: reason, willReconnect: true});
      this._retry(1006, reason);
    }

    _retry(code, reason) {
      var delay = backoffDelay(this._attempt, this.options.backoff);
      this._attempt += 1;
      this._lastClose = {code: code, reason: reason};
      this._setState("reconnecting", {code: code, reason: reason, delay: delay,
                                      attempt: this._attempt});
      var self = this;
      var generation = ++this._generation;
      this._timers.retry = setTimeout(function () {
        if (generation === self._generation) self._connect();
      }, delay);
    }

    _stop(code, reason) {
      this._generation++;
      this._clearTimers();
      var requests = Array.from(this._requests.keys());
      for (var i = 0; i < requests.length; i++) {
        this._settle(requests[i], new SquallError("closed", "the connection closed (" + code +
                                                  (reason ? ": " + reason : "") + ")"));
      }
      if (this.state !== "closed") this._setState("closed", {code: code, reason: reason});
    }

    /** Forget the current socket: its callbacks, timers and unanswered subscribes. */
    _detach() {
      var socket = this._socket;
      this._socket = null;
      this._clearTimers();
      if (socket) {
        socket.onopen = socket.onmessage = socket.onclose = null;
      }
      var self = this;
      this._requests.forEach(function (request, ref) {
        if (request.kind !== "publish") self._requests.delete(ref);
      });
      this._entries.forEach(function (entry) {
        entry.subscribed = false;
        entry.replay = null;  // undelivered: the next resume asks for it again
      });
    }

    _clearTimers() {
      clearTimeout(this._timers.connect);
      clearTimeout(this._timers.retry);
      clearTimeout(this._timers.stable);
      clearTimeout(this._timers.pong);
      clearInterval(this._timers.ping);
      this._timers = {};
    }

    _ping() {
      if (this._timers.pong) return;
      var self = this;
      this._send({type: "ping", ref: this._nextRef++});
      this._timers.pong = setTimeout(function () {
        self._abandon("ping timeout");
      }, this.options.pingTimeout);
    }

    // -- frames ---------------------------------------------------------------------

    _isOpen() {
      return Boolean(this._socket) && this._socket.readyState === 1;
    }

    _send(frame) {
      if (this._isOpen()) this._socket.send(JSON.stringify(frame));
    }

    _sendSubscribe(entry) {
      var ref = this._nextRef++;
      var frame = {type: "subscribe", topic: entry.topic, ref: ref};
      if (entry.lastId) {
        frame.since = entry.lastId;
        entry.replay = [];
      }
      this._requests.set(ref, {kind: "subscribe", entry: entry, since: entry.lastId});
      this._send(frame);
    }

    _onMessage(text) {
      // any frame proves the connection is alive
      clearTimeout(this._timers.pong);
      this._timers.pong = null;
      var frame;
      try {
        frame = JSON.parse(text);
      } catch (error) {
        this._emit("error", new SquallError("invalid_frame", "not JSON: " + String(text)));
        return;
      }
      if (frame.type === "event") this._onEvent(frame);
      else if (frame.type === "subscribed") this._onSubscribed(frame);
      else if (frame.type === "published") this._settle(frame.ref, null, frame);
      else if (frame.type === "error") this._onError(frame);
    }

    _onEvent(event) {
      var self = this;
      this._entries.forEach(function (entry) {
        if (!topicMatches(entry.topic, event.topic)) return;
        if (entry.replay) entry.replay.push(event);
        else self._deliver(entry, event);
      });
    }

    _deliver(entry, event) {
      if (!entry.accept(event)) return;
      entry.subscriptions.forEach(function (subscription) { subscription._deliver(event); });
      if (this._recent.add(eventKey(event))) this._emit("event", event);
    }

    _onSubscribed(frame) {
      var request = this._requests.get(frame.ref);
      if (!request || request.kind !== "subscribe") return;
      this._requests.delete(frame.ref);
      var entry = request.entry;
      if (this._entries.get(entry.topic) !== entry) return;  // unsubscribed meanwhile
      entry.subscribed = true;
      entry.retries = 0;
      var self = this;
      var replayed = entry.takeReplay(frame.recovered !== false);
      var info = {topic: entry.topic};
      if (typeof frame.recovered === "boolean") info.recovered = frame.recovered;
      if (frame.recovered === false) {
        // the gap comes before the events replayed with it (all accepted after the
        // loss, e.g. since the server restarted): the app reloads, then applies them
        var failure = {topic: entry.topic, since: request.since};
        entry.subscriptions.forEach(function (subscription) {
          subscription._call("onRecoveryFailed", failure);
        });
        this._emit("recovery_failed", failure);
      }
      replayed.forEach(function (event) { self._deliver(entry, event); });
      // a subscription that saw no event yet resumes from where it started
      if (!entry.lastId && frame.last_id) entry.lastId = frame.last_id;
      entry.subscriptions.forEach(function (subscription) {
        subscription._resolve(info);
        subscription._call("onSubscribed", info);
      });
      this._emit("subscribed", info);
    }

    _onError(frame) {
      var error = new SquallError(frame.code, frame.message, frame);
      var request = this._requests.get(frame.ref);
      if (request && request.kind === "publish") {
        this._settle(frame.ref, error);
        return;
      }
      if (request && request.kind === "subscribe") {
        this._requests.delete(frame.ref);
        if (RETRIED_SUBSCRIBE_ERRORS.indexOf(frame.code) >= 0) {
          this._retrySubscribe(request.entry);
          return;
        }
        this._failSubscription(request.entry, error);
      }
      this._emit("error", error);
    }

    /** The server could not subscribe now (its broker is down): ask again later. */
    _retrySubscribe(entry) {
      var self = this;
      var socket = this._socket;
      entry.replay = null;
      var delay = backoffDelay(entry.retries++, this.options.backoff);
      setTimeout(function () {
        if (self._socket === socket && self._isOpen() && self._entries.get(entry.topic) === entry) {
          self._sendSubscribe(entry);
        }
      }, delay);
    }

    /** A refused subscribe (invalid_topic, forbidden, ...): it is not retried. */
    _failSubscription(entry, error) {
      if (this._entries.get(entry.topic) === entry) this._entries.delete(entry.topic);
      error.topic = entry.topic;
      entry.subscriptions.forEach(function (subscription) {
        subscription._reject(error);
        subscription._call("onError", error);
        subscription.active = false;
      });
    }

    _settle(ref, error, reply) {
      var request = this._requests.get(ref);
      if (!request || request.kind !== "publish") return;
      this._requests.delete(ref);
      clearTimeout(request.timer);
      if (error) request.reject(error);
      else request.resolve(reply);
    }

    _drop(subscription) {
      var entry = subscription._entry;
      entry.subscriptions.delete(subscription);
      if (entry.subscriptions.size || this._entries.get(entry.topic) !== entry) return;
      this._entries.delete(entry.topic);
      if (this.state === "open") {
        this._send({type: "unsubscribe", topic: entry.topic, ref: this._nextRef++});
      }
    }

    // -- events for the app -----------------------------------------------------------

    _setState(state, details) {
      var previous = this.state;
      this.state = state;
      this._emit("state", Object.assign({state: state, previous: previous}, details));
    }

    _emit(name, payload) {
      var listeners = this._listeners.get(name);
      if (!listeners) return;
      Array.from(listeners).forEach(function (listener) { safely(listener, [payload]); });
    }
  }

  Squall.SquallError = SquallError;
  Squall.topicMatches = topicMatches;
  Squall.backoffDelay = backoffDelay;
  Squall.PROTOCOL = PROTOCOL;
  root.Squall = Squall;
})(globalThis);
