/*
 * squall.js: the browser client for Squall (protocol v1, JSON only): WebSocket, or
 * Server-Sent Events where WebSockets cannot get through.
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
 *
 * Transports: WebSocket first; after `fallbackAfter` WebSocket handshakes failed in a
 * row (or with `transport: "sse"`) it follows its topics over `GET /v1/sse` instead,
 * reopening the stream when the topics change and resuming from the last event id,
 * and publishes with `POST /v1/topics/{topic}/events`. `client.transport` and the
 * "transport" event say which one is in use.
 */
(function (root) {
  "use strict";

  var PROTOCOL = "squall.v1.json";
  var CLOSE_UNAUTHORIZED = 4001;
  // Close codes after which reconnecting cannot help (docs/protocol.md, Close codes).
  // 4010: disconnected by the backend (POST /v1/disconnect).
  var TERMINAL_CODES = [1000, 1009, 4000, 4003, 4010];
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
    transport: "auto",       // "auto" (WebSocket, then SSE), "websocket" or "sse"
    fallbackAfter: 3,        // failed WebSocket handshakes in a row before SSE ("auto")
    sseUrl: null,            // the SSE endpoint (default: the url's /v1/sse)
    WebSocket: null,         // the WebSocket constructor (default: the global one)
    EventSource: null,       // the EventSource constructor (default: the global one)
    fetch: null              // fetch, for publishing over HTTP on SSE (default: the global one)
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

  /** The SSE endpoint next to a WebSocket URL: /v1/ws becomes /v1/sse, ws(s) http(s). */
  function streamUrl(url, sseUrl) {
    var base = root.location ? root.location.href : undefined;
    var resolved = new URL(sseUrl || url || "/v1/ws", base);
    if (resolved.protocol === "ws:") resolved.protocol = "http:";
    if (resolved.protocol === "wss:") resolved.protocol = "https:";
    if (!sseUrl) resolved.pathname = resolved.pathname.replace(/\/ws$/, "/sse");
    resolved.search = "";
    return resolved;
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
      this._source = null;           // the EventSource, on SSE
      this._timers = {};
      this.transport = null;         // "websocket" or "sse" once open
      this._failedHandshakes = 0;    // WebSocket handshakes failed in a row
      this._opened = false;          // whether the current connection opened
      this._streamId = null;         // the last event seen live: where a stream resumes
      this._restreaming = false;
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

    /**
     * Listen: "state", "open", "close", "event", "subscribed", "recovery_failed", "error",
     * "join" and "leave" (presence frames of `presence_topics` names: {type, topic, client}),
     * "transport" ({transport}: "websocket" or "sse").
     */
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
      if (fresh && this._isOpen()) {
        if (this.transport === "sse") this._restream();
        else this._sendSubscribe(entry);
      }
      return subscription;
    }

    /**
     * Publish (over the socket, or over HTTP on SSE); resolves with the `published` reply,
     * rejects with SquallError.
     */
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
        if (self._isOpen()) self._sendPublish(request);
      });
    }

    /** Connect (again): after `close()`, or with `autoConnect: false`. */
    connect() {
      if (this.state === "connecting" || this.state === "open") return;
      this._attempt = 0;
      this._failedHandshakes = 0;
      this._lastClose = null;
      this._connect();
    }

    /** Close for good (until `connect()`); pending publishes reject with code "closed". */
    close() {
      var connected = Boolean(this._socket || this._source);
      if (this._socket) this._socket.close(1000, "client closed");
      this._detach();
      if (connected) {
        this._emit("close", {code: 1000, reason: "client closed", willReconnect: false});
      }
      this._stop(1000, "client closed");
    }

    // -- connecting -------------------------------------------------------------------

    _connect() {
      var generation = ++this._generation;
      this._setState("connecting", {attempt: this._attempt});
      if (!this._needToken) {
        this._openTransport();
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
          self._openTransport();
        }, function (error) {
          if (generation !== self._generation) return;
          self._emit("error", error);
          self._retry(reason.code || CLOSE_UNAUTHORIZED, "getToken failed");
        });
    }

    _openTransport() {
      var mode = this.options.transport;
      var fallBack = mode === "auto" && this._failedHandshakes >= this.options.fallbackAfter;
      this._opened = false;
      if (mode === "sse" || fallBack) this._openStream();
      else this._openSocket();
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
      this._opened = true;
      this._failedHandshakes = 0;
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
        if (request.kind === "publish") self._sendPublish(request);
      });
      this._opened = true;
      this._setTransport("websocket");
      this._setState("open");
      this._emit("open", {url: this.url, transport: "websocket"});
    }

    _onClose(code, reason) {
      if (!this._opened && this.transport !== "sse") this._failedHandshakes += 1;
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
      if (socket && !this._opened) this._failedHandshakes += 1;
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

    /** Forget the current socket or stream: its callbacks, timers and unanswered subscribes. */
    _detach() {
      var socket = this._socket;
      this._socket = null;
      this._clearTimers();
      if (socket) {
        socket.onopen = socket.onmessage = socket.onclose = null;
      }
      this._closeStream();
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
      if (this.transport === "sse") return this.state === "open" && this._opened;
      return Boolean(this._socket) && this._socket.readyState === 1;
    }

    _send(frame) {
      if (this._socket && this._socket.readyState === 1) this._socket.send(JSON.stringify(frame));
    }

    _sendPublish(request) {
      if (this.transport === "sse" && !this._socket) this._httpPublish(request);
      else this._send(request.frame);
    }

    _setTransport(name) {
      if (this.transport === name) return;
      this.transport = name;
      this._emit("transport", {transport: name});
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
      else if (frame.type === "join" || frame.type === "leave") this._emit(frame.type, frame);
    }

    _onEvent(event) {
      var self = this;
      var live = true;
      this._entries.forEach(function (entry) {
        if (!entry.subscribed || entry.replay) live = false;
      });
      // a stream resumes from the last event seen while no replay was under way: during
      // replays, events of different topics do not come in id order
      if (live) this._streamId = event.id;
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
      var key = frame.ref !== undefined ? frame.ref : "sse:" + frame.topic;  // SSE: no refs
      var request = this._requests.get(key);
      if (!request || request.kind !== "subscribe") return;
      this._requests.delete(key);
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
      if (!request && this.transport === "sse" && frame.ref === undefined &&
          RETRIED_SUBSCRIBE_ERRORS.indexOf(frame.code) >= 0) {
        this._restreamLater();  // a stream's subscribe failed: reopen it after a while
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
      if (this.state === "open" && this.transport === "sse") this._restream();
      else if (this.state === "open") {
        this._send({type: "unsubscribe", topic: entry.topic, ref: this._nextRef++});
      }
    }

    // -- Server-Sent Events -------------------------------------------------------------

    /**
     * Follow every entry over one SSE stream, resuming from the last event seen. With no
     * entry there is no stream: the client counts as open and publishes over HTTP.
     */
    _openStream(quiet) {
      var self = this;
      var url = streamUrl(this.url, this.options.sseUrl);
      var since = this._streamSince();
      this._entries.forEach(function (entry) {
        url.searchParams.append("topic", entry.topic);
        entry.replay = since ? [] : null;
        self._requests.set("sse:" + entry.topic, {kind: "subscribe", entry: entry, since: since});
      });
      if (!this._entries.size) {
        if (!quiet) this._onStreamOpen();
        return;
      }
      if (since) url.searchParams.set("since", since);
      if (this.token) url.searchParams.set("token", this.token);
      var Source = this.options.EventSource || root.EventSource;
      var source;
      try {
        source = new Source(url.toString());
      } catch (error) {
        this._emit("error", error);
        this._stop(1006, String(error && error.message));
        return;
      }
      this._source = source;
      source.onopen = function () { if (!quiet) self._onStreamOpen(); };
      source.onmessage = function (message) { self._onMessage(message.data); };
      ["subscribed", "join", "leave"].forEach(function (name) {
        source.addEventListener(name, function (message) { self._onMessage(message.data); });
      });
      source.addEventListener("close", function (message) { self._onStreamClose(message.data); });
      // "error" is both the server's error events (with data) and the stream's own failures
      source.addEventListener("error", function (message) {
        if (typeof message.data === "string") self._onMessage(message.data);
        else self._abandon("stream failed");
      });
      if (!quiet) {
        this._timers.connect = setTimeout(function () {
          self._abandon("connect timeout");
        }, this.options.connectTimeout);
      }
    }

    _onStreamOpen() {
      clearTimeout(this._timers.connect);
      var self = this;
      this._opened = true;
      this._timers.stable = setTimeout(function () {
        self._attempt = 0;
      }, this.options.backoff.resetAfter);
      this._setTransport("sse");
      this._setState("open");
      this._requests.forEach(function (request) {
        if (request.kind === "publish") self._httpPublish(request);
      });
      this._emit("open", {url: this.url, transport: "sse"});
    }

    /** The server ends the stream: never let EventSource reconnect on its own. */
    _onStreamClose(data) {
      var frame;
      try {
        frame = JSON.parse(data);
      } catch (error) {
        frame = {code: 1006, reason: "malformed close event"};
      }
      this._onClose(frame.code, frame.reason || "");
    }

    _closeStream() {
      var source = this._source;
      this._source = null;
      if (source) {
        source.onopen = source.onmessage = null;
        source.close();
      }
    }

    /** The topics changed: open a new stream for them (once per turn), from the last id. */
    _restream() {
      if (this._restreaming) return;
      this._restreaming = true;
      var self = this;
      Promise.resolve().then(function () {
        self._restreaming = false;
        if (self.transport !== "sse" || self.state !== "open") return;
        self._closeStream();
        self._requests.forEach(function (request, ref) {
          if (request.kind === "subscribe") self._requests.delete(ref);
        });
        self._entries.forEach(function (entry) { entry.subscribed = false; });
        self._openStream(true);
      });
    }

    /** Reopen the stream after a backoff (its server could not subscribe now). */
    _restreamLater() {
      var self = this;
      var source = this._source;
      var delay = backoffDelay(this._streamRetries = (this._streamRetries || 0) + 1,
                               this.options.backoff);
      setTimeout(function () {
        if (self._source === source) self._restream();
      }, delay);
    }

    /** One id for every topic of a stream: the last live one, else a given `since`. */
    _streamSince() {
      if (this._streamId) return this._streamId;
      var since = null;
      this._entries.forEach(function (entry) { since = since || entry.lastId; });
      return since;
    }

    /** On SSE publishes go over HTTP, with the same idempotency key as over the socket. */
    _httpPublish(request) {
      if (request.sending) return;
      request.sending = true;
      var self = this;
      var frame = request.frame;
      var url = streamUrl(this.url, this.options.sseUrl);
      url.pathname = url.pathname.replace(/\/sse$/, "") + "/topics/" +
        encodeURIComponent(frame.topic) + "/events";
      var headers = {"Content-Type": "application/json", "Idempotency-Key": frame.idempotency_key};
      if (this.token) headers.Authorization = "Bearer " + this.token;
      var fetcher = this.options.fetch || root.fetch.bind(root);
      fetcher(url.toString(), {method: "POST", headers: headers, body: JSON.stringify(frame.data)})
        .then(function (response) {
          return response.json().then(function (body) { return [response, body]; });
        })
        .then(function (answer) {
          var response = answer[0], body = answer[1];
          if (response.ok) {
            self._settle(frame.ref, null, {type: "published", topic: body.topic, id: body.id,
                                           ts: body.ts, ref: frame.ref});
            return;
          }
          var error = body && body.error ? body.error : {code: "http_" + response.status};
          self._settle(frame.ref, new SquallError(error.code, error.message,
                                                  {type: "error", code: error.code,
                                                   message: error.message, ref: frame.ref}));
        }, function () {
          request.sending = false;  // unreachable: sent again (same key) when open again
        });
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
