"""The streaming batch (handlers/stream.py): NDJSON lines published as they arrive,
answered line by line, in order, with bad lines refused one by one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import pytest

from server.errors import BrokerUnavailable
from tests.rawws import open_stream
from tests.waiting import eventually

pytestmark = pytest.mark.gen_test(timeout=30)

NDJSON = {"Content-Type": "application/x-ndjson"}


def lines(*entries: object) -> bytes:
    return b"".join(json.dumps(entry).encode() + b"\n" for entry in entries)


def answers(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.splitlines()]


async def post(http_client, base_url, body: bytes, **kwargs):
    return await http_client.fetch(f"{base_url}/v1/events", method="POST", body=body,
                                   headers=NDJSON, raise_error=False, **kwargs)


async def test_every_line_gets_its_answer_in_order(http_client, base_url, ws_connect):
    subscriber = await ws_connect(query="topic=nd.*")
    await subscriber.recv_type("subscribed")
    body = (lines({"topic": "nd.a", "data": 1}, {"topic": "nd..bad", "data": 2})
            + b"\n   \nnot json\n"
            + lines({"topic": "nd.b", "data": {"x": [1]}, "idempotency_key": "k1"},
                    {"topic": "nd.b", "data": "again", "idempotency_key": "k1"},
                    {"topic": "nd.a"}, {"topic": "nd.a", "data": "x" * 70_000})
            + b'{"topic": "nd.c", "data": "last, no newline"}')
    response = await post(http_client, base_url, body)
    assert response.code == 202
    assert response.headers["Content-Type"] == "application/x-ndjson"
    got = answers(response.body)
    assert [answer.get("topic") or answer["error"]["code"] for answer in got] == [
        "nd.a", "invalid_topic", "invalid_body", "nd.b", "nd.b", "invalid_body",
        "payload_too_large", "nd.c"]
    assert [answer.get("line") for answer in got] == [None, 2, 5, None, None, 8, 9, None]
    assert got[3]["id"] == got[4]["id"]  # a repeated key answers with the first id
    events = await subscriber.events(3)
    assert [event["data"] for event in events] == [1, {"x": [1]}, "last, no newline"]
    assert [event["id"] for event in events] == [got[0]["id"], got[3]["id"], got[7]["id"]]


async def test_a_broker_failure_is_the_answer_of_each_line_it_left_unknown(
        http_client, base_url, node, monkeypatch):
    async def unavailable(requests):
        raise BrokerUnavailable("the broker did not answer (test)")

    monkeypatch.setattr(node.broker, "publish", unavailable)
    body = (lines({"topic": "nd.a", "data": 1}) + b"\n"
            + lines({"topic": "nd..bad", "data": 2}, {"topic": "nd.b", "data": 3}))
    got = answers((await post(http_client, base_url, body)).body)
    assert [(answer["error"]["code"], answer["line"]) for answer in got] == [
        ("broker_unavailable", 1), ("invalid_topic", 3), ("broker_unavailable", 4)]


@pytest.mark.settings(max_frame_bytes=1024)
async def test_a_line_over_the_limit_is_refused_and_the_next_ones_go(http_client, base_url):
    body = (lines({"topic": "nd.a", "data": 1}) + b'{"topic": "nd.a", "data": "'
            + b"y" * 300_000 + b'"}\n' + lines({"topic": "nd.a", "data": 3}))
    got = answers((await post(http_client, base_url, body)).body)
    assert [answer.get("error", {}).get("code") for answer in got] == [
        None, "payload_too_large", None]
    assert got[1]["line"] == 2


@pytest.mark.settings(max_stream_bytes=4096)
async def test_a_body_over_the_stream_limit(http_client, base_url):
    declared = await post(http_client, base_url, lines(*[{"topic": "nd.a", "data": "z" * 100}
                                                          for _ in range(60)]))
    assert declared.code == 413  # its Content-Length says so before anything is read

    # with no length given, the lines before the limit are answered, then the limit
    body = lines(*[{"topic": "nd.lim", "data": ["z" * 100, n]} for n in range(60)])
    reader, writer = await asyncio.open_connection("127.0.0.1", int(base_url.rsplit(":", 1)[1]))
    try:
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), 512):
            part = body[start:start + 512]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, chunks = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202")
    text = b"".join(chunks.split(b"\r\n")[1::2])
    got = [json.loads(line) for line in text.splitlines() if line.startswith(b"{")]
    assert got[-1]["error"]["code"] == "payload_too_large"
    assert all("id" in answer for answer in got[:-1]) and 0 < len(got) - 1 < 60


@pytest.mark.settings(max_stream_bytes=4096)
async def test_a_body_far_over_the_stream_limit_sent_at_once(http_client, base_url, http_port,
                                                             node):
    """Tornado hands small chunks on 64 KiB at a time: a body far past the limit, all
    sent before anything is read, still gets the lines within the limit published and
    answered, then the limit, in one well-formed answer: the rest is read and dropped."""
    body = lines(*[{"topic": "nd.far", "data": n} for n in range(8000)])  # ~270 KB
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    try:
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"".join(b"%x\r\n%s\r\n" % (len(body[at:at + 4000]), body[at:at + 4000])
                                for at in range(0, len(body), 4000)) + b"0\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, chunked = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202") and b"HTTP/1.1" not in chunked
    assert chunked.endswith(b"0\r\n\r\n")  # the last chunk: the answer is whole
    text = b"".join(chunked.split(b"\r\n")[1::2])
    got = [json.loads(line) for line in text.splitlines()]
    assert got[-1]["error"]["code"] == "payload_too_large"
    published = [answer for answer in got[:-1] if "id" in answer]
    assert len(published) == len(got) - 1 and len(published) > 100
    assert node.hub.published == len(published)


@pytest.mark.settings(max_stream_bytes=4096)
async def test_a_body_a_mebibyte_past_the_stream_limit_is_cut(http_server, http_port, node):
    body = lines(*[{"topic": "nd.cut", "data": n} for n in range(60_000)])  # ~2 MB
    within = body[:4096].count(b"\n")

    def exchange() -> bytes:  # a blocking client: it sends all, then reads to the end
        with socket.create_connection(("127.0.0.1", http_port), timeout=10) as sock:
            sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
            with contextlib.suppress(ConnectionError):  # the server stopped reading
                for at in range(0, len(body), 4000):
                    part = body[at:at + 4000]
                    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            received = b""
            with contextlib.suppress(ConnectionError):  # the unread rest may reset it
                while chunk := sock.recv(65536):
                    received += chunk
            return received

    # the server ends the connection (a timeout here would mean it read on and on)
    await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, exchange), 20)
    assert node.hub.published == within


async def test_a_client_cut_off_half_way_publishes_each_complete_line_once(
        http_client, base_url, http_port, node):
    _, writer = await asyncio.open_connection("127.0.0.1", http_port)
    whole = lines(*[{"topic": "nd.cut", "data": n, "idempotency_key": f"c{n}"}
                    for n in range(3)])
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson"
                 b"\r\nContent-Length: 100000\r\n\r\n" + whole + b'{"topic": "nd.cut", "da')

    async def published() -> list:
        response = await http_client.fetch(f"{base_url}/v1/topics/nd.cut/events")
        return json.loads(response.body)["events"]

    await eventually(published, what="the complete lines published")
    await eventually(lambda: node.hub.published >= 3, what="three events")
    writer.close()  # the fourth line never ends
    await asyncio.sleep(0.3)  # a partial line would be published by now, if it were
    assert [event["data"] for event in await published()] == [0, 1, 2]
    assert node.hub.published == 3


async def test_an_integer_beyond_64_bits_is_refused_even_across_chunks(http_client, base_url,
                                                                       http_port):
    """The long-integer check runs once per read: a number split between two reads
    must still be seen whole."""
    reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
    first, second = b'{"topic": "nd.big", "data": 1234567890', b'12345678901}\n'
    body = lines({"topic": "nd.big", "data": "ok"}) + first + second
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: "
                 b"application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[:-len(second)])
    await writer.drain()
    await asyncio.sleep(0.1)  # the first read ends inside the number
    writer.write(second)
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    got = [json.loads(line) for line in reply.partition(b"\r\n\r\n")[2].split(b"\r\n")
           if line.startswith(b"{")]
    assert "id" in got[0]
    assert got[1]["error"]["code"] == "invalid_body" and got[1]["line"] == 2


async def test_a_client_that_reads_no_answers_stops_its_body_being_read(http_server, http_port,
                                                                      node):
    """Answers wait in the socket, not in the server: once they fill it, the server
    reads no more of the body, so a client that never reads cannot fill its memory."""
    _, writer = await open_stream(http_port, rcvbuf=4096)
    body_bytes = 60 * 2**20
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson"
                 b"\r\nContent-Length: %d\r\n\r\n" % body_bytes)
    chunk = lines(*[{"topic": "nd.r", "data": 0}] * 4096)  # answers are twice as long
    sent = 0
    try:
        while sent + len(chunk) < body_bytes:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 2.0)
            sent += len(chunk)
    except TimeoutError:
        pass  # the server stopped reading
    finally:
        writer.transport.abort()  # close() would wait for the unsent lines
    assert sent < body_bytes / 3, f"the server read {sent} bytes of unanswered lines"
    assert node.hub.published > 0  # it did read, and answer, until then
