"""How the server process ends: a graceful drain on SIGTERM, and a non-zero exit when the engine
dies (so that Docker or Kubernetes restarts it).

Drain: on the first SIGTERM or SIGINT, ``/ready`` answers 503 and new generation requests get
503 with ``Retry-After`` (``server.admission``), while the requests in flight, streams included,
run on for up to ``--drain-timeout`` seconds. A request still running then is cut: a stream ends
with an error event and ``[DONE]``, a request whose response has not started gets 503. Then
uvicorn stops and the process exits 0. A second signal cuts the drain short.

Engine death: a watchdog polls the engine client; vLLM has already failed the requests in flight
with an error; the process exits 1 a moment later.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("fluxserve.lifecycle")

ENGINE_DEATH_EXIT_CODE = 1
WATCHDOG_INTERVAL_S = 0.5
# After the engine dies, the requests it failed get this long to send their error responses.
ENGINE_DEATH_GRACE_S = 1.0
# After the drain deadline, the requests cut short get this long to send their error events.
CUT_GRACE_S = 2.0
# uvicorn's own grace once the drain is over (only non-generation requests can be left).
UVICORN_GRACEFUL_SHUTDOWN_S = 5


@dataclass
class Lifecycle:
    """The process's state between start and exit. ``in_flight`` holds the tasks serving the
    generation requests (kept by ``server.admission``)."""

    drain_timeout_s: float = 30.0
    draining: bool = False
    exit_code: int = 0
    server: uvicorn.Server | None = None
    in_flight: set[asyncio.Task] = field(default_factory=set)
    cut: set[asyncio.Task] = field(default_factory=set)
    # Why the requests in ``cut`` were cut: the drain timeout, or a second signal
    cut_immediately: bool = False
    _drain_task: asyncio.Task | None = field(default=None, repr=False)

    def begin_drain(self, *, immediate: bool = False) -> None:
        """Start the drain (run on the event loop). ``immediate``: cut what is in flight now."""
        if self.draining and not immediate:
            return
        if not self.draining:
            logger.info("draining: %d generation requests in flight, up to %gs (--drain-timeout)",
                        len(self.in_flight), self.drain_timeout_s)
        self.draining = True
        self.cut_immediately = immediate
        if self._drain_task is not None:
            self._drain_task.cancel()
        timeout = 0.0 if immediate else self.drain_timeout_s
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout))

    async def _drain(self, timeout_s: float) -> None:
        if not await self._wait_idle(timeout_s):
            logger.warning("%s: cutting %d generation requests short",
                           "second signal" if self.cut_immediately else "drain timeout",
                           len(self.in_flight))
            for task in list(self.in_flight):
                self.cut.add(task)
                task.cancel("drain timeout")
            await self._wait_idle(CUT_GRACE_S)
        logger.info("drained; stopping")
        self.stop(0)

    async def _wait_idle(self, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return not self.in_flight

    def cut_message(self) -> str:
        """What a request cut short by the drain is told."""
        why = ("a second shutdown signal ended its drain" if self.cut_immediately
               else f"its drain timeout ({self.drain_timeout_s:g} s) ended")
        return (f"The server is shutting down and {why} before this request finished. "
                "Retry on another replica.")

    def stop(self, exit_code: int) -> None:
        """Make uvicorn shut down; the process exits with the highest code asked for."""
        self.exit_code = max(self.exit_code, exit_code)
        if self.server is not None:
            self.server.should_exit = True


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT starts ``Lifecycle``'s drain instead of
    closing the listening socket at once; a second one cuts the drain short, a third forces."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.server = self
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's captured signals: uvicorn would re-raise it after the
        # shutdown, and the process would die by the signal instead of exiting with our code.
        self._signals += 1
        logger.info("received %s", signal.Signals(sig).name)
        if self._signals >= 3 or self._loop is None:
            self.should_exit = True
            self.force_exit = self._signals >= 3
            return
        immediate = self._signals == 2
        self._loop.call_soon_threadsafe(lambda: self.lifecycle.begin_drain(immediate=immediate))


async def watch_engine(app: FastAPI) -> None:
    """Stop the process (exit 1) once an engine (the chat model's, or the reward model's when
    one is served) has failed to start or has died."""
    engines = [app.state.engine]
    if getattr(app.state, "reward_engine", None) is not None:
        engines.append(app.state.reward_engine)
    lifecycle: Lifecycle = app.state.lifecycle
    reason = None
    while reason is None:
        await asyncio.sleep(WATCHDOG_INTERVAL_S)
        reason = next((e.failure() for e in engines if e.failure() is not None), None)
    logger.error("engine dead (%s): exiting with status %d so that the server is restarted",
                 reason, ENGINE_DEATH_EXIT_CODE)
    await asyncio.sleep(ENGINE_DEATH_GRACE_S)
    lifecycle.stop(ENGINE_DEATH_EXIT_CODE)
