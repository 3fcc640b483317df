"""10,000 HTTP requests and 2,000 WebSocket frames, seeded, against a real server.

The cases come from tests/fuzzing.py. The run must see no 5xx, no error without the
JSON error shape, no request left unanswered, no WebSocket closed without a protocol
close code, a bystander subscriber that receives an event published after every
batch of cases, and no traceback or error line in the server's log. Its figures go
to tests/artifacts/fuzz.json.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import websockets

from tests.fuzzing import Figures, http_case, send_http, ws_session
from tests.server_process import ServerProcess, run_async

HTTP_CASES = 10_000
WS_FRAMES = 2_000
SEED = 20261201
BATCHES = 20
ARTIFACTS = Path(__file__).parent / "artifacts"


def test_every_surface_survives_ten_thousand_hostile_requests_and_frames():
    with ServerProcess() as server:
        figures = run_async(fuzz(server.port))
        log = "".join(server.log)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(figures.summary(), indent=2) + "\n")
    assert figures.problems == []
    assert figures.http_cases >= HTTP_CASES and figures.ws_frames >= WS_FRAMES
    bad = [line for line in log.splitlines() if "Traceback" in line or " ERROR " in line]
    assert bad == []


async def fuzz(port: int) -> Figures:
    rng = random.Random(SEED)
    figures = Figures()
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws?topic=fz.calm",
                                  open_timeout=10) as bystander:
        assert json.loads(await bystander.recv())["type"] == "subscribed"
        for batch in range(BATCHES):
            cases = [http_case(rng) for _ in range(HTTP_CASES // BATCHES)]
            for start in range(0, len(cases), 8):  # a few in flight at once
                await asyncio.gather(*(send_http(port, case, figures)
                                       for case in cases[start:start + 8]))
            await ws_session(port, rng, WS_FRAMES // BATCHES, figures)
            await calm(port, bystander, batch, figures)
    return figures


async def calm(port: int, bystander: websockets.ClientConnection, batch: int,
               figures: Figures) -> None:
    """The bystander still gets what is published to its topic, and nothing was lost."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"batch": batch}).encode()
    writer.write(b"POST /v1/topics/fz.calm/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    await reader.read()
    writer.close()
    while True:
        frame = json.loads(await asyncio.wait_for(bystander.recv(), 10))
        if frame["type"] == "event" and frame["data"] == {"batch": batch}:
            return
        if frame["type"] == "event" and not isinstance(frame["data"], dict):
            continue  # a fuzz case published to the calm topic
        if frame["type"] != "event":
            figures.problem(f"the bystander got {frame}")
