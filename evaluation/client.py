"""HTTP client for OpenAI-compatible servers: retries, bounded concurrency, a progress bar, and
discovery of what the server accepts (models, context length, fluxserve's extension fields,
`/tokenize`).

Shared by the evaluation commands; it speaks plain HTTP (httpx) so that it works against any
OpenAI-compatible server, not only fluxserve.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_URL = "http://127.0.0.1:8000"
# Statuses worth another try: overload (429 with Retry-After from admission control), a server
# still starting (503), and gateway hiccups.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_BACKOFF_S = 30.0
JSON_HEADERS = {"Content-Type": "application/json"}


class ApiError(RuntimeError):
    """A request the server answered with an error (after retries), or could not be sent.

    `status` is the HTTP status (0 for a transport error); `message` the OpenAI error message
    when the body carried one."""

    def __init__(self, status: int, message: str, path: str = ""):
        super().__init__(f"HTTP {status} from {path}: {message}" if status else message)
        self.status, self.message, self.path = status, message, path


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)[:500]


def _backoff_s(attempt: int, response: httpx.Response | Exception | None) -> float:
    if isinstance(response, httpx.Response):
        retry_after = response.headers.get("retry-after")
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(MAX_BACKOFF_S, float(retry_after))
    return min(MAX_BACKOFF_S, 0.5 * 2 ** attempt) * (0.5 + random.random() / 2)


_RETRY = object()  # an attempt's outcome: failed, and worth another try


def _outcome(sent: httpx.Response | httpx.TransportError, path: str, last: bool) -> Any:
    """What one attempt at `path` came to, the same for every client (`sent`: its response or
    its transport error): a success's decoded JSON body, or `_RETRY` for a retryable status or
    a transport error while tries are left (`last` is False). Raises `ApiError` otherwise
    (status 0, from the error, for a transport error)."""
    if isinstance(sent, httpx.TransportError):
        if last:
            raise ApiError(0, f"{type(sent).__name__}: {sent}", path) from sent
        return _RETRY
    if sent.status_code < 400:
        return sent.json()
    if sent.status_code not in RETRY_STATUSES or last:
        raise ApiError(sent.status_code, _error_message(sent), path)
    return _RETRY


@dataclass
class ClientConfig:
    """Where and how to talk to the server. `timeout_s` bounds one request (seconds);
    `max_retries` counts extra tries after a retryable status or a transport error."""

    base_url: str = DEFAULT_URL
    api_key: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 4

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def root(self) -> str:
        """The server root: a trailing ``/v1`` in the URL is dropped (paths add it)."""
        url = self.base_url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url


class SyncClient:
    """Blocking JSON requests with retries (discovery, tokenization)."""

    def __init__(self, config: ClientConfig):
        self.config = config
        self._http = httpx.Client(base_url=config.root, headers=config.headers,
                                  timeout=config.timeout_s)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, json: Any = None, retries: int | None = None
                ) -> Any:
        """Send one request; returns the decoded JSON body. Raises `ApiError`."""
        retries = self.config.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                sent: httpx.Response | httpx.TransportError = self._http.request(
                    method, path, json=json)
            except httpx.TransportError as exc:
                sent = exc
            if (body := _outcome(sent, path, last=attempt == retries)) is not _RETRY:
                return body
            time.sleep(_backoff_s(attempt, sent))
        raise AssertionError("unreachable")


class AsyncClient:
    """Concurrent JSON requests with retries; `map` runs many with a bound and a progress bar."""

    def __init__(self, config: ClientConfig, concurrency: int = 8):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.config = config
        self.concurrency = concurrency
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = httpx.AsyncClient(base_url=config.root, headers=config.headers,
                                       timeout=config.timeout_s, limits=limits)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        """Send one request; returns the decoded JSON body. Raises `ApiError`."""
        retries = self.config.max_retries
        for attempt in range(retries + 1):
            try:
                sent: httpx.Response | httpx.TransportError = await self._http.request(
                    method, path, json=json)
            except httpx.TransportError as exc:
                sent = exc
            if (body := _outcome(sent, path, last=attempt == retries)) is not _RETRY:
                return body
            await asyncio.sleep(_backoff_s(attempt, sent))
        raise AssertionError("unreachable")

    async def stream_events(self, path: str, json_body: Any) -> AsyncIterator[tuple[float, Any]]:
        """POST `json_body` (a request with ``stream: true``) and yield each server-sent event as
        ``(elapsed_s, data)``: the seconds since the request was sent (monotonic clock, measured
        from the attempt that got the stream) and the event's decoded JSON. Ends at
        ``data: [DONE]`` or when the server closes the stream.

        Retries like `request` while no event has arrived (a retryable status or a transport
        error); after the first event a failure is not retried. Raises `ApiError`: for an error
        status, a transport error, an undecodable event, or an error event
        (``data: {"error": {...}}``, how OpenAI-compatible servers end a failed stream)."""
        # serialized before the clock starts: a long token-id prompt takes milliseconds
        content = json.dumps(json_body).encode()
        retries = self.config.max_retries
        for attempt in range(retries + 1):
            response = None
            events = 0
            started = time.perf_counter()
            try:
                async with self._http.stream("POST", path, content=content,
                                             headers=JSON_HEADERS) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _outcome(response, path, last=attempt == retries)  # raises unless retried
                    else:
                        async for line in response.aiter_lines():
                            if not line.startswith("data:"):
                                continue  # comments, event names, blank separators
                            payload = line[5:].strip()
                            if payload == "[DONE]":
                                return
                            elapsed = time.perf_counter() - started
                            try:
                                data = json.loads(payload)
                            except ValueError as exc:
                                raise ApiError(response.status_code,
                                               f"undecodable event {payload[:200]!r}",
                                               path) from exc
                            if isinstance(data, dict) and "error" in data:
                                err = data["error"]
                                raise ApiError(response.status_code, str(
                                    err.get("message", err) if isinstance(err, dict) else err),
                                    path)
                            events += 1
                            yield elapsed, data
                        return
            except httpx.TransportError as exc:
                # after the first event a failure is not retried
                _outcome(exc, path, last=bool(events) or attempt == retries)
            await asyncio.sleep(_backoff_s(attempt, response))
        raise AssertionError("unreachable")

    async def map(self, worker: Callable[[T], Awaitable[R]], items: Iterable[T], *,
                  desc: str = "requests", on_result: Callable[[T, R], None] | None = None,
                  progress: bool = True) -> list[R]:
        """Run ``worker(item)`` for every item, at most `concurrency` at once, with a tqdm
        progress bar. `on_result` is called as each finishes (in completion order), e.g. to
        append it to a results file. Returns the results in the items' order; an exception in a
        worker propagates (catch it inside the worker to record per-item failures)."""
        items = list(items)
        gate = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(items), desc=desc, unit="req", disable=not progress,
                   dynamic_ncols=True)

        async def one(item: T) -> R:
            async with gate:
                result = await worker(item)
            if on_result is not None:
                on_result(item, result)
            bar.update(1)
            return result

        try:
            return await asyncio.gather(*(one(item) for item in items))
        finally:
            bar.close()


# Optional, non-OpenAI completion fields that fixed-length benchmarks use: vLLM's `ignore_eos`
# and `min_tokens` (either makes a request generate exactly max_tokens tokens).
COMPLETION_OPTIONS = ("ignore_eos", "min_tokens")


@dataclass
class ServerInfo:
    """What the server told us about itself.

    `extension_fields` holds the fluxserve request fields (``flux``, ``kv_policy``) that the
    server's OpenAPI schema declares: a server that does not declare a field is never sent it.
    `max_model_len` is None when the server does not say. `completion_options` holds the
    optional `/v1/completions` fields among `COMPLETION_OPTIONS` that the schema declares."""

    model: str
    models: list[str]
    max_model_len: int | None
    extension_fields: set[str] = field(default_factory=set)
    continue_final_message: bool = False
    completion_options: set[str] = field(default_factory=set)
    owned_by: str = ""

    @property
    def is_fluxserve(self) -> bool:
        return {"flux", "kv_policy"} <= self.extension_fields


def _schema_properties(openapi: dict, schema_name_part: str) -> set[str]:
    props: set[str] = set()
    for name, schema in (openapi.get("components", {}).get("schemas", {}) or {}).items():
        if schema_name_part.lower() in name.lower():
            props |= set((schema.get("properties") or {}).keys())
    return props


def discover(client: SyncClient, model: str | None = None) -> ServerInfo:
    """Ask the server for its models (``GET /v1/models``) and its OpenAPI schema.

    Raises `ApiError` when the server does not answer ``/v1/models``, and ValueError when
    `model` is not among its models."""
    cards = client.request("GET", "/v1/models").get("data", [])
    names = [c["id"] for c in cards]
    if not names:
        raise ValueError("the server lists no models")
    chosen = model or names[0]
    if chosen not in names:
        raise ValueError(f"model {chosen!r} is not served; the server has {names}")
    card = next(c for c in cards if c["id"] == chosen)
    max_len = card.get("max_model_len")
    try:
        openapi = client.request("GET", "/openapi.json", retries=0)
    except ApiError:
        openapi = {}  # many servers publish no schema: then no extension field is sent
    chat_props = _schema_properties(openapi, "ChatRequest") | _schema_properties(
        openapi, "ChatCompletionRequest")
    completion_props = _schema_properties(openapi, "CompletionsRequest") | _schema_properties(
        openapi, "CompletionRequest")
    fields = {f for f in ("flux", "kv_policy") if f in chat_props and f in completion_props}
    return ServerInfo(model=chosen, models=names,
                      max_model_len=int(max_len) if max_len else None,
                      extension_fields=fields,
                      continue_final_message="continue_final_message" in chat_props,
                      completion_options={f for f in COMPLETION_OPTIONS if f in completion_props},
                      owned_by=str(card.get("owned_by", "")))


def discover_or_raise(client: SyncClient, model: str | None,
                      error: Callable[[str], Exception]) -> ServerInfo:
    """`discover`, for a command: a server that does not answer ``/v1/models`` raises
    ``error("cannot list the models of <server root>: <why>")`` (the command's own error type,
    from the `ApiError`); ValueError as `discover`."""
    try:
        return discover(client, model)
    except ApiError as exc:
        raise error(f"cannot list the models of {client.config.root}: {exc}") from exc
