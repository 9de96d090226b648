"""Admission control holds a slot per generation request until its response is done."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from server.admission import AdmissionControl, RejectionCounter
from server.lifecycle import Lifecycle
from server.metrics import REJECTED


def _app(limit: int, gate: asyncio.Event, started: asyncio.Queue | None = None,
         lifecycle: Lifecycle | None = None) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions():
        async def body():
            if started is not None:
                started.put_nowait(None)
            yield b"data: first\n\n"
            await gate.wait()  # a long stream: the slot stays taken until it ends
            yield b"data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"data": []}

    @app.post("/v1/chat/completions")
    async def chat():  # a non-streamed reply that waits on the gate
        if started is not None:
            started.put_nowait(None)
        await gate.wait()
        return {"done": True}

    app.add_middleware(AdmissionControl, max_in_flight=limit,
                       lifecycle=lifecycle or Lifecycle())
    app.add_middleware(RejectionCounter)  # as server.app stacks them
    return app


def test_requests_beyond_the_limit_get_429_and_slots_are_returned():
    async def scenario():
        gate, started = asyncio.Event(), asyncio.Queue()
        app = _app(2, gate, started)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/v1/completions")) for _ in range(2)]
            for _ in held:  # both streams are open and hold their slots
                await asyncio.wait_for(started.get(), timeout=30)
            busy = await client.post("/v1/completions")
            assert busy.status_code == 429
            error = busy.json()["error"]
            assert error["code"] == 429 and error["type"] == "rate_limit_exceeded"
            assert busy.headers["retry-after"] == "1"
            # other routes are never limited
            assert (await client.get("/v1/models")).status_code == 200
            gate.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            # every slot came back
            again = await asyncio.gather(*(client.post("/v1/completions") for _ in range(2)))
            assert [r.status_code for r in again] == [200, 200]

    asyncio.run(scenario())


def test_zero_means_no_limit():
    async def scenario():
        gate = asyncio.Event()
        gate.set()
        app = _app(0, gate)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            codes = [r.status_code for r in await asyncio.gather(
                *(client.post("/v1/completions") for _ in range(20)))]
        assert codes == [200] * 20

    asyncio.run(scenario())


def test_rejections_are_counted_under_the_routes_endpoint_labels():
    async def scenario():
        gate, started = asyncio.Event(), asyncio.Queue()
        app = _app(1, gate, started)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            held = asyncio.create_task(client.post("/v1/completions"))
            await asyncio.wait_for(started.get(), timeout=30)
            for path in ("/v1/chat/completions", "/v1/completions"):
                assert (await client.post(path)).status_code == 429
            gate.set()
            assert (await held).status_code == 200

    before = {e: REJECTED.labels(e, "429")._value.get() for e in ("chat", "completions")}
    asyncio.run(scenario())
    for endpoint in ("chat", "completions"):
        assert REJECTED.labels(endpoint, "429")._value.get() == before[endpoint] + 1


class _FakeServer:
    should_exit = False


def test_drain_lets_requests_in_flight_finish_and_refuses_new_ones():
    async def scenario():
        gate, started = asyncio.Event(), asyncio.Queue()
        lifecycle = Lifecycle(drain_timeout_s=30)
        lifecycle.server = _FakeServer()
        app = _app(0, gate, started, lifecycle)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/v1/completions")) for _ in range(3)]
            for _ in held:
                await asyncio.wait_for(started.get(), timeout=30)
            lifecycle.begin_drain()
            refused = await client.post("/v1/chat/completions")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == 503
            assert (await client.get("/v1/models")).status_code == 200  # not a generation route
            await asyncio.sleep(0.2)
            assert not lifecycle.server.should_exit  # still draining
            gate.set()
            for resp in await asyncio.gather(*held):
                assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
            await asyncio.wait_for(lifecycle._drain_task, timeout=5)
            assert lifecycle.server.should_exit and lifecycle.exit_code == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("second_signal", [False, True], ids=["drain timeout", "second signal"])
def test_a_cut_ends_streams_with_an_error_event_and_replies_with_503(second_signal):
    """The drain timeout, or a second signal during a long drain, cuts what is in flight: a
    stream ends with an error event naming why, a reply not started gets 503."""
    why = "second shutdown signal" if second_signal else "drain timeout (0.3 s)"

    async def scenario():
        gate, started = asyncio.Event(), asyncio.Queue()  # the gate never opens
        lifecycle = Lifecycle(drain_timeout_s=300 if second_signal else 0.3)
        app = _app(0, gate, started, lifecycle)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            stream = asyncio.create_task(client.post("/v1/completions"))
            reply = asyncio.create_task(client.post("/v1/chat/completions"))
            for _ in range(2):
                await asyncio.wait_for(started.get(), timeout=30)
            lifecycle.begin_drain()
            if second_signal:
                await asyncio.sleep(0.2)
                assert not stream.done()  # a 300 s drain: still waiting
                lifecycle.begin_drain(immediate=True)
            stream_resp, reply_resp = await asyncio.wait_for(asyncio.gather(stream, reply), 10)
        assert stream_resp.status_code == 200
        events = [e for e in stream_resp.text.split("\n\n") if e]
        assert events[0] == "data: first"
        assert events[1].startswith('data: {"error": ') and why in events[1]
        assert events[2:] == ["data: [DONE]"]
        assert reply_resp.status_code == 503 and reply_resp.headers["retry-after"] == "1"
        assert why in reply_resp.json()["error"]["message"]
        assert not lifecycle.in_flight

    asyncio.run(scenario())


def test_the_first_signal_drains_and_the_process_exits_zero():
    import signal

    import uvicorn

    from server.lifecycle import DrainingServer

    async def scenario():
        lifecycle = Lifecycle(drain_timeout_s=30)
        server = DrainingServer(uvicorn.Config(FastAPI()), lifecycle)
        server._loop = asyncio.get_running_loop()
        server.handle_exit(signal.SIGTERM, None)
        assert not server.should_exit  # the listening socket stays open while draining
        await asyncio.sleep(0.3)
        assert lifecycle.draining and server.should_exit and lifecycle.exit_code == 0
        # not recorded for uvicorn to re-raise after its shutdown (that would kill by signal)
        assert server._captured_signals == []

    asyncio.run(scenario())
