"""``GET /v1/sse``: Server-Sent Events, for ``EventSource``, proxies that refuse
WebSocket, and ``curl -N``.

``GET /v1/sse?topic=T[&topic=U...][&since=ID][&token=JWT]``. Everything is checked
before the stream starts and a bad request gets the API's JSON error: no topic
(400 ``invalid_body``), a bad topic (400 ``invalid_topic``), more topics than
``max_subscriptions`` (429), a bad token (401), an origin or a topic the client may
not have (403), connections over the limits (429). Then the handler detaches the
connection and answers ``200 text/event-stream`` by hand (``Cache-Control: no-cache``,
``X-Accel-Buffering: no``, ``Connection: close``: the body ends with the connection),
the stream opens with ``retry: <sse_retry in ms>``, and a ``Session`` takes over with
one subscribe per topic, each resuming from ``Last-Event-ID`` (sent by EventSource on
every reconnect) or else ``since``.

Framing is server/wire.py's ``SSE`` format: events unnamed with ``id:``, replies and
errors named after their type. A comment (``: ping``) goes out every
``sse_heartbeat`` seconds. Closing writes an event named ``close`` with the close
code a WebSocket would get, then half-closes; whatever the client sends is dropped.
"""

from __future__ import annotations

from dataclasses import replace

from handlers.base import ApiHandler
from server.admission import Admitted, Request, admit
from server.auth import authorize
from server.errors import SquallError
from server.session import Session
from server.topics import InvalidTopic, validate_pattern
from server.wire import SSE
from transports.stream import StreamTransport, take_stream


class EventStreamTransport(StreamTransport):
    """One SSE stream: the client only listens."""

    __slots__ = ()

    def closing_bytes(self, code: int, reason: str) -> bytes:
        return SSE.frame({"type": "close", "code": code, "reason": reason})


class EventStreamHandler(ApiHandler):
    """Checks one SSE request, then hands the stream to a session."""

    def prepare(self) -> None:
        for values in self.request.query_arguments.values():
            for value in values:
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise SquallError("invalid_body", "a query parameter is not UTF-8") from None

    async def get(self) -> None:
        topics = self._topics()
        request = self.request
        admitted = await admit(self.node, Request(
            ip=request.remote_ip or "", token=self.get_query_argument("token", None),
            authorization=request.headers.get("Authorization"),
            origin=request.headers.get("Origin"), host=request.host, headers=request.headers,
            query={key: [value.decode() for value in values]
                   for key, values in request.query_arguments.items()}))
        try:
            await self._authorize(admitted, topics)
        except BaseException:
            admitted.release()
            raise
        since = request.headers.get("Last-Event-ID") or self.get_query_argument("since", None)
        transport = EventStreamTransport(take_stream(self, 200, "OK", self._stream_headers()))
        transport.write(b"retry: %d\n\n" % round(self.node.settings.sse_retry * 1000))
        session = Session(self.node, transport, SSE, admitted)
        transport.sink = session
        transport.read()  # to see the client leave
        session.start({"type": "subscribe", "topic": topic, "since": since} for topic in topics)

    def _topics(self) -> list[str]:
        """The request's topics, checked and without repeats."""
        settings = self.node.settings
        topics = list(dict.fromkeys(self.get_query_arguments("topic")))
        if not topics:
            raise SquallError("invalid_body", "give the topics to follow: ?topic=T&topic=U")
        if len(topics) > settings.max_subscriptions:
            raise SquallError("too_many_subscriptions", f"a stream may follow at most "
                              f"{settings.max_subscriptions} topics")
        try:
            return [validate_pattern(topic, settings.max_topic_length) for topic in topics]
        except InvalidTopic as exc:
            raise SquallError("invalid_topic", str(exc)) from None

    async def _authorize(self, admitted: Admitted, topics: list[str]) -> None:
        """403 unless every topic may be followed (401 for a client without a
        credential, as over all of HTTP); what the authorization webhook approved joins
        the grant, so the session does not ask again."""
        rights, hook = admitted.rights, self.node.auth_hook
        approved = []
        for topic in topics:
            if hook is None:
                authorize(rights, rights.check_subscribe, topic)
            elif not rights.may_subscribe(topic):
                await hook.subscribe(admitted.info, rights, topic)
                approved.append(topic)
        if approved:
            admitted.rights = replace(rights, subscribe=(*rights.subscribe, *approved))

    def _stream_headers(self) -> list[tuple[str, str]]:
        headers = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                   ("X-Accel-Buffering", "no"), ("Connection", "close")]
        origin = self.request.headers.get("Origin")
        if origin is not None:  # admitted: an allowed origin
            headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return headers
