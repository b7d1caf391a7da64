"""The HTTP search service over an embedding index, and the web page that calls it.

`create_app(index)` builds the FastAPI app; `serve(index_dir)` opens an index and runs it under
uvicorn on loopback. Concurrent queries share model calls (`MicroBatcher`). Every bad request gets
a 4xx with `{"error": "..."}` naming the field and the fix; only a bug gives a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from polysense.data.transforms import to_rgb
from polysense.errors import PolysenseError

if TYPE_CHECKING:
    from polysense.index import EmbeddingIndex, Hit

log = logging.getLogger("polysense.serve")

MODALITIES = ("image", "text")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")  # what an upload may be
JSON_FIELDS = ("text", "image", "k", "modality", "dedup")
FORM_FIELDS = ("file", "k", "modality", "dedup")


@dataclass(frozen=True)
class Limits:
    """What the service bounds: the size of one request, the work in flight, and time.

    Anything larger than a size limit is refused before it is decoded. Image decodes run in
    `max_decodes` worker threads; `max_queued_decodes` more may wait for one, and an upload
    beyond that gets 503 with Retry-After instead of memory. The timeouts close connections
    that stall (uvicorn itself has none for headers or bodies). docs/serve.md lists them all."""

    max_image_bytes: int = 5 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096  # decoded pixels (width x height), read from the header
    max_text_chars: int = 1000
    max_k: int = 100
    max_body_bytes: int = 8 * 1024 * 1024  # base64 of a 5 MiB image is 6.7 MiB
    max_json_containers: int = 1024  # `[` and `{` in a JSON body: a query is one flat object
    max_decodes: int = 2  # images decoded at once
    max_queued_decodes: int = 8  # uploads waiting for a decode slot; beyond: 503
    max_connections: int = 64  # open connections plus running requests; beyond: 503
    header_timeout_s: float = 10.0  # from connect (or the last response) to complete headers
    body_timeout_s: float = 10.0  # longest silence while a request body arrives
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    request_timeout_s: float = 30.0  # decode + queue + model time of one search; beyond: 503

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise PolysenseError(f"Limits.{name} must be a number > 0, got {value!r}")
        if self.max_body_bytes < self.max_image_bytes:
            raise PolysenseError(
                f"Limits.max_body_bytes ({self.max_body_bytes}) must be >= max_image_bytes "
                f"({self.max_image_bytes}), or no image of the allowed size could be uploaded"
            )
        if self.max_json_containers < 2:
            raise PolysenseError("Limits.max_json_containers must be >= 2 (one object, one list)")

    @classmethod
    def parse(cls, items: Sequence[str]) -> Limits:
        """`NAME=VALUE` strings (the CLI's `--limit`) over the defaults."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise PolysenseError(
                    f"--limit {item!r}: use NAME=VALUE with NAME one of {', '.join(known)}"
                )
            kind = float if known[name] == "float" else int
            try:
                values[name] = kind(text.strip().replace("_", ""))
            except ValueError:
                raise PolysenseError(
                    f"--limit {item!r}: {name} takes {'a number' if kind is float else 'an integer'}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class Batching:
    """Micro-batching of queries: each model call takes up to `max_items` queries, namely all
    that queued while the previous call ran, then waits up to `max_wait_ms` for more (0: no
    extra wait, so a lone query is never delayed and concurrent ones still share calls)."""

    max_items: int = 32
    max_wait_ms: float = 0.0


class ApiError(PolysenseError):
    """A request the service refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class MicroBatcher:
    """Groups concurrent queries into one model call.

    Requests wait in an asyncio queue; a worker takes every queued request (up to `max_items`),
    then whatever arrives within `max_wait_ms`, runs `answer` once on the batch in `executor`
    (one thread hop per batch: the model call and the index search happen together there), and
    hands each request its answer. `calls` and `items` count model calls and queries served.
    """

    def __init__(
        self,
        *,
        answer: Callable[[list[Any]], Sequence[Any]],
        batching: Batching,
        executor: Executor,
    ) -> None:
        self.answer = answer
        self.batching = batching
        self.executor = executor
        self.calls = 0
        self.items = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: Any) -> Any:
        """Answer one query; returns its answer once its batch has run."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # first use, or a new event loop (a test client): start a worker on this loop
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._work(self._queue))
        future: asyncio.Future[Any] = loop.create_future()
        assert self._queue is not None
        await self._queue.put((item, future))
        return await future

    async def stop(self) -> None:
        """Cancel the worker; queries still waiting get an error rather than hanging."""
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            while self._queue is not None and not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(ApiError(503, "the server is shutting down"))
        self._task = None

    async def _work(self, queue: asyncio.Queue[tuple[Any, asyncio.Future[np.ndarray]]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.batching.max_items and not queue.empty():
                batch.append(queue.get_nowait())  # what queued while the last call ran
            deadline = loop.time() + self.batching.max_wait_ms / 1000
            while len(batch) < self.batching.max_items:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled
            if live:
                await self._run(loop, live)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        live: list[tuple[Any, asyncio.Future[np.ndarray]]],
    ) -> None:
        try:
            rows = await loop.run_in_executor(self.executor, self.answer, [x for x, _ in live])
            if len(rows) != len(live):
                raise RuntimeError(f"answer returned {len(rows)} rows for {len(live)} queries")
        except Exception as exc:
            if len(live) > 1:  # one bad query must not fail the others: retry them one by one
                for one in live:
                    await self._run(loop, [one])
                return
            log.exception("encoding a query failed")
            if not live[0][1].done():
                live[0][1].set_exception(exc)
            return
        self.calls += 1
        self.items += len(live)
        for (_, future), row in zip(live, rows, strict=True):
            if not future.done():  # the client may have gone away meanwhile
                future.set_result(row)


def _be_nice() -> None:
    """Lower this thread's CPU priority (Linux schedules threads one by one): a flood of large
    uploads then takes the CPU time the event loop and the model leave, not theirs."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class DecodePool:
    """Image decoding off the event loop, bounded: `workers` threads decode, at most `queued`
    more requests wait for one, and a request beyond that is refused at once with 503 (the
    client retries after `retry_after_s`) rather than holding its image in memory. The count is
    guarded by a thread lock, not an asyncio primitive, so one pool serves any event loop."""

    def __init__(self, *, workers: int, queued: int, retry_after_s: int = 1) -> None:
        self.capacity = workers + queued
        self.retry_after_s = retry_after_s
        self.refused = 0
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="polysense-decode", initializer=_be_nice
        )
        self._lock = threading.Lock()
        self._in_flight = 0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a decode thread, or ApiError(503) when `capacity` requests are in."""
        with self._lock:
            if self._in_flight >= self.capacity:
                self.refused += 1
                raise ApiError(
                    503,
                    f"the server is decoding {self._in_flight} images already (its limit); "
                    f"retry in {self.retry_after_s} s",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self._in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._lock:
                self._in_flight -= 1


# --- request parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchQuery:
    """One validated /search request: exactly one of `text` and `raw` (an image's bytes, not yet
    decoded). `image` is the decoded query in the form the model takes (see `prepare_image`)."""

    text: str | None
    raw: bytes | None
    k: int
    modality: str
    dedup: float | None
    image: Any = None
    image_size: tuple[int, int] | None = None


def _show(value: Any) -> str:
    """A short JSON-ish rendering of a client's value for an error message."""
    text = json.dumps(value, default=lambda o: type(o).__name__)
    return text if len(text) <= 40 else text[:37] + "..."


def check_k(value: Any, limits: Limits) -> int:
    """`k` as an int in 1..limits.max_k."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, f"k must be an integer, got {_show(value)}")
    if not 1 <= value <= limits.max_k:
        raise ApiError(422, f"k={value} is out of range; use 1 <= k <= {limits.max_k}")
    return value


def check_modality(value: Any) -> str:
    if value not in MODALITIES:
        raise ApiError(
            422, f"modality must be 'image' or 'text' (what to return), got {_show(value)}"
        )
    return value


def check_dedup(value: Any) -> float | None:
    """The near-duplicate threshold: None (off) or a cosine similarity in (0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(422, f"dedup must be a number in (0, 1] or null, got {_show(value)}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ApiError(422, f"dedup={value} is out of range; use a cosine threshold in (0, 1]")
    return float(value)


def _form_number(value: Any, name: str, kind: type) -> Any:
    """A form field's text as int/float, so that the JSON checks apply to it too."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"the form field `{name}` must be text, not a file")
    try:
        return kind(value.strip())
    except ValueError:
        raise ApiError(
            422, f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None


def check_text(value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise ApiError(422, f"text must be a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" from a JSON escape
        raise ApiError(
            422,
            f"text holds {value[exc.start]!a} at position {exc.start}, which is not a Unicode "
            "character (a lone UTF-16 surrogate); send valid text",
        ) from None
    text = value.strip()
    if not text:
        raise ApiError(422, 'text is empty; send a description such as "a red circle"')
    if len(text) > limits.max_text_chars:
        raise ApiError(
            422, f"text has {len(text)} characters; the limit is {limits.max_text_chars}"
        )
    return text


def decode_base64(value: Any, limits: Limits) -> bytes:
    """Standard base64, optionally as a data URL (`data:image/png;base64,...`)."""
    if not isinstance(value, str):
        raise ApiError(422, f"image must be a base64 string, got {_show(value)}")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if not head.endswith(";base64"):
            raise ApiError(422, "image is a data URL without ';base64'; send base64 data")
    value = "".join(value.split())  # tolerate line breaks
    if len(value) > (limits.max_image_bytes + 2) // 3 * 4:
        raise ApiError(
            413, f"image is larger than the limit of {limits.max_image_bytes} bytes; shrink it"
        )
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            422,
            "image is not valid base64 (use the standard alphabet A-Z a-z 0-9 + / with = "
            "padding, e.g. `base64 -w0 file.png`)",
        ) from None
    return data


def load_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> RGB image, checking the byte count and the header's pixel count before decoding."""
    if not data:
        raise ApiError(422, "image is empty (0 bytes); send a PNG or JPEG file")
    if len(data) > limits.max_image_bytes:
        raise ApiError(
            413, f"image has {len(data)} bytes; the limit is {limits.max_image_bytes}; shrink it"
        )
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:  # the header claims > 2 * Image.MAX_IMAGE_PIXELS
        raise ApiError(
            413,
            f"image has far too many pixels (a decompression bomb?); the limit is "
            f"{limits.max_image_pixels}",
        ) from None
    except Exception:  # Pillow raises several types for bytes that are not an image
        raise ApiError(
            422, f"image is not a readable image; send one of {', '.join(IMAGE_FORMATS)}"
        ) from None
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ApiError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{limits.max_image_pixels}; resize it",
        )
    if width == 0 or height == 0:
        raise ApiError(422, f"image is {width}x{height}: it has no pixels")
    try:
        image.load()
        return to_rgb(image)  # transparency onto white, as the model's own preprocessing does
    except Exception as exc:  # truncated file, corrupt stream
        raise ApiError(422, f"image could not be decoded ({exc}); is the file complete?") from None


def parse_json(body: bytes, limits: Limits) -> Any:
    """The JSON body, refusing before parsing one with more arrays/objects than a query can hold.

    A valid query is one flat object whose only free text is `text` (at most `max_text_chars`),
    so counting `[` and `{` bytes bounds the parser's work and depth exactly: millions of nested
    or empty lists cost a byte count, not seconds of the parser holding the GIL."""
    containers = body.count(b"[") + body.count(b"{")
    if containers > limits.max_json_containers:
        raise ApiError(
            413,
            f"the JSON body holds {containers} '[' or '{{' characters; the limit is "
            f"{limits.max_json_containers} (a search is one flat object like {_EXAMPLE})",
        )
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise ApiError(400, f"the body is not valid JSON ({exc}); send e.g. {_EXAMPLE}") from None


async def _json_query(body: bytes, limits: Limits) -> SearchQuery:
    if len(body) > 64 * 1024:  # a base64 image: parse it off the event loop
        data = await asyncio.to_thread(parse_json, body, limits)
    else:
        data = parse_json(body, limits)
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object like {_EXAMPLE}")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise ApiError(
            422,
            f"unknown field(s) {', '.join(map(_show, unknown))}; allowed: {', '.join(JSON_FIELDS)}",
        )
    k = check_k(data.get("k", 10), limits)
    modality = check_modality(data.get("modality", "image"))
    dedup = check_dedup(data.get("dedup"))
    has_text, has_image = data.get("text") is not None, data.get("image") is not None
    if has_text == has_image:
        raise ApiError(
            422,
            "send exactly one of `text` (a string) and `image` (base64); "
            f"got {'both' if has_text else 'neither'}",
        )
    if has_text:
        return SearchQuery(check_text(data["text"], limits), None, k, modality, dedup)
    return SearchQuery(None, decode_base64(data["image"], limits), k, modality, dedup)


async def _form_query(request: Request, limits: Limits) -> SearchQuery:
    try:
        form = await request.form(max_files=1, max_fields=len(FORM_FIELDS))
    except StarletteHTTPException as exc:  # python-multipart could not parse the body
        raise ApiError(
            400,
            f"the multipart body could not be read ({exc.detail}); send a `file` field the way "
            "`curl -F file=@image.png` does",
        ) from None
    try:
        unknown = sorted(set(form) - set(FORM_FIELDS))
        if unknown:
            raise ApiError(
                422,
                f"unknown form field(s) {', '.join(map(_show, unknown))}; allowed: "
                f"{', '.join(FORM_FIELDS)}",
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "the multipart form needs a `file` field holding the image file")
        k = _form_number(form.get("k"), "k", int)
        k = check_k(10 if k is None else k, limits)
        modality = check_modality(form.get("modality", "image"))
        dedup = check_dedup(_form_number(form.get("dedup"), "dedup", float))
        raw = await upload.read(limits.max_image_bytes + 1)
    finally:
        await form.close()
    return SearchQuery(None, raw, k, modality, dedup)


def prepare_image(
    raw: bytes, limits: Limits, preprocess: Callable[[list[Image.Image]], Any]
) -> Any:
    """Bytes -> the model's input for one image (`preprocess([image])`, e.g. a (1, 3, H, W)
    tensor) and the image's size. Runs in a decode thread: the full-size decoded image lives only
    here, so memory is bounded by `Limits.max_decodes` decodes, not by the queue's length."""
    image = load_image(raw, limits)
    return preprocess([image]), image.size


_EXAMPLE = '{"text": "a red circle", "k": 10}'


async def parse_search(request: Request, limits: Limits) -> SearchQuery:
    """A /search request (JSON or multipart) -> a validated `SearchQuery`, or an ApiError."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _form_query(request, limits)
    body = await request.body()
    if not body.strip():
        raise ApiError(400, f"the request body is empty; send JSON like {_EXAMPLE}")
    if media != "application/json":
        raise ApiError(
            415,
            f"content type {media or '(none)'!r} is not supported; send application/json "
            "(text or base64 image) or multipart/form-data (a `file` upload)",
        )
    return await _json_query(body, limits)


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413, with or without a
    Content-Length header (a chunked upload is counted as it arrives), and a body that goes
    silent for `timeout_s` gets 408 and its connection closed."""

    def __init__(self, app: Any, *, limit: int, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"the request body is larger than {self.limit} bytes; send a smaller image "
            "(see the limits in GET /health)"
        )
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            status = 413 if length.isdigit() else 400
            text = message if status == 413 else "the Content-Length header is not a number"
            await JSONResponse({"error": text}, status_code=status)(scope, receive, send)
            return
        seen, done = 0, False

        async def limited() -> Any:
            nonlocal seen, done
            if done:  # the body is complete: what follows is a wait for disconnect, untimed
                return await receive()
            try:
                event = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise ApiError(
                    408,
                    f"the request body stalled: nothing arrived for {self.timeout_s:g} s "
                    f"after {seen} bytes; send the whole body at once",
                    headers={"Connection": "close"},
                ) from None
            seen += len(event.get("body", b""))
            done = event["type"] != "http.request" or not event.get("more_body", False)
            if seen > self.limit:
                raise ApiError(413, message)
            return event

        await self.app(scope, limited, send)


def host_names(bound: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The Host header names a server bound to `bound` answers to: the loopback names when it
    is loopback, the bound address otherwise, plus `extra` (`--allow-host`; `*` allows any)."""
    loopback = ("127.0.0.1", "localhost", "::1")
    try:
        address = ipaddress.ip_address(bound)
        names = loopback if address.is_loopback else (str(address), *loopback)
    except ValueError:  # a host name
        names = (bound.lower(), *loopback) if bound != "localhost" else loopback
    return tuple(dict.fromkeys([*names, *(h.strip().lower() for h in extra)]))


def _host_of(header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class _HostCheck:
    """ASGI middleware against DNS rebinding: a request whose Host header is not one of the
    server's own names (a page on evil.example that resolved its name to 127.0.0.1) gets 400."""

    def __init__(self, app: Any, *, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if _host_of(raw) not in self.allowed:
            shown = raw[:60] or "(none)"
            text = (
                f"Host header {shown!r} is not a name of this server ({', '.join(sorted(self.allowed))}); "
                "to serve under another name start it with --allow-host NAME"
            )
            await JSONResponse({"error": text}, status_code=400)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- the app ------------------------------------------------------------------------------------


def static_dir() -> Path:
    """The web page's files, shipped inside the package."""
    return Path(str(resources.files("polysense.serve") / "static"))


def _answer(index: EmbeddingIndex, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
    """Encode a batch of queries of one kind (all text or all image) in one model call, then
    search the index for each (k, modality and dedup may differ per query)."""
    model = index.model
    with torch.inference_mode():
        if queries[0].text is not None:
            emb = model.encode_text([q.text for q in queries])  # (B, D)
        elif isinstance(queries[0].image, torch.Tensor):
            emb = model.encode_image(torch.cat([q.image for q in queries]))  # (B, D)
        else:
            emb = model.encode_image([image for q in queries for image in q.image])  # (B, D)
    emb = emb.float().cpu().numpy()
    return [
        index.search(emb[i : i + 1], k=q.k, modality=q.modality, dedup=q.dedup)[0]
        for i, q in enumerate(queries)
    ]


def _image_url(key: str) -> str:
    return f"/items/{quote(key, safe='')}/image"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote a client's text; a lone surrogate in it must not fail the response
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _item_key(request: Request) -> tuple[str, bool]:
    """The key of an /items/... request and whether it asks for the image. Read from the raw
    path, so that a key holding `/` (an image-folder file `cats/1`) is sent as `cats%2F1`; a
    literal `/image` ending asks for the image (`_image_url` always encodes the key's `/`)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    rest = raw.decode("latin-1").partition("/items/")[2]
    wants_image = rest.endswith("/image")
    return unquote(rest[: -len("/image")] if wants_image else rest), wants_image


def _public(value: Any) -> Any:
    """An absolute path cut to its file name: the server's directory layout is not the
    client's business. A relative path (an index's `image_path`) is shown as it is."""
    return Path(value).name if isinstance(value, str) and Path(value).is_absolute() else value


def _without_paths(meta: dict[str, Any]) -> dict[str, Any]:
    """Item metadata with each absolute path (`source`, an old index's `image_path` ...) cut to
    its file name."""
    return {k: _public(v) for k, v in meta.items()}


def create_app(
    index: EmbeddingIndex,
    *,
    limits: Limits = Limits(),
    batching: Batching = Batching(),
    allowed_hosts: Sequence[str] | None = None,
) -> FastAPI:
    """The search service over `index` (an opened `EmbeddingIndex`; its `.model` encodes queries).

    The model runs in one worker thread (torch parallelises inside a call; a batch at a time
    keeps memory flat); image decoding runs in a bounded `DecodePool`; index reads (thread-safe)
    run in the default thread pool, so none of them blocks the event loop. `allowed_hosts`
    (`host_names(...)`; `serve` always passes it) turns on the Host-header check; None leaves it
    off for in-process use such as tests' clients."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polysense-model")
    model = index.model  # loads the checkpoint now: a broken one fails at start, not per query
    preprocess = getattr(model, "preprocess", lambda images: images)
    decoder = DecodePool(workers=limits.max_decodes, queued=limits.max_queued_decodes)
    batchers = {
        kind: MicroBatcher(answer=lambda qs: _answer(index, qs), batching=batching, executor=worker)
        for kind in ("text", "image")
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        for batcher in batchers.values():
            await batcher.stop()

    app = FastAPI(
        title="polysense search",
        summary="Text and image search over a polysense embedding index.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.index, app.state.limits, app.state.batchers = index, limits, batchers
    app.state.decoder = decoder
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if allowed_hosts is not None:
        app.add_middleware(_HostCheck, allowed=allowed_hosts)  # added last: runs first

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(PolysenseError)
    async def _polysense_error(request: Request, exc: PolysenseError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client went away during %s %s", request.method, request.url.path)
        return _error(400, "the client disconnected before sending the whole request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; the API is listed at /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("bug while serving %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return _error(422, "; ".join(parts) or "invalid request")

    async def run_query(query: SearchQuery) -> tuple[SearchQuery, list[Hit]]:
        if query.text is not None:
            return query, await batchers["text"].submit(query)
        assert query.raw is not None
        image, size = await decoder.run(prepare_image, query.raw, limits, preprocess)
        query = replace(query, raw=None, image=image, image_size=size)
        return query, await batchers["image"].submit(query)

    @app.post("/search", openapi_extra=_SEARCH_OPENAPI)
    async def search(request: Request) -> JSONResponse:
        """Nearest items to a text or an image query (JSON, or a multipart `file` upload)."""
        start = time.perf_counter()
        query = await parse_search(request, limits)
        n_bytes = 0 if query.raw is None else len(query.raw)
        try:
            query, hits = await asyncio.wait_for(run_query(query), limits.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                503,
                f"the search took longer than {limits.request_timeout_s:g} s (the server is "
                "busy); retry later",
                headers={"Retry-After": "5"},
            ) from None
        if query.text is not None:
            described: dict[str, Any] = {"text": query.text}
        else:
            assert query.image_size is not None
            width, height = query.image_size
            described = {"image": {"width": width, "height": height, "bytes": n_bytes}}
        described.update(k=query.k, modality=query.modality, dedup=query.dedup)
        results = [
            {
                "key": hit.key,
                "score": round(float(hit.score), 6),
                "caption": hit.caption,
                "modality": hit.modality,
                "image_path": _public(hit.image_path),  # relative to the source's folder
                "image_url": _image_url(hit.key),
            }
            for hit in hits  # fewer than k when the index holds fewer
        ]
        took_ms = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse({"query": described, "results": results, "took_ms": took_ms})

    @app.get("/items/{key:path}", response_model=None)
    async def item(request: Request) -> Response:
        """An item's metadata (key, captions, source file name, split), or with `/image` after
        the key, its image as PNG. Encode a `/` inside the key as `%2F`."""
        key, wants_image = _item_key(request)
        meta = await asyncio.to_thread(index.item, key)
        if meta is None:
            raise ApiError(404, f"no item with key {key!r} in this index")
        if wants_image:
            data = await asyncio.to_thread(index.image_bytes, key)
            if data is None:
                raise ApiError(404, f"item {key!r} has no image")
            return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})
        return JSONResponse({**_without_paths(meta), "image_url": _image_url(key)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the index size and dimension, the request limits and batching counters."""
        return {
            "status": "ok",
            "items": len(index),
            "dim": int(index.dim),
            "limits": {**limits.__dict__},
            "batches": {m: {"calls": b.calls, "items": b.items} for m, b in batchers.items()},
            "refused_decodes": decoder.refused,
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(static_dir() / "index.html")

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app


_SEARCH_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "text": {"type": "string", "maxLength": Limits.max_text_chars},
                        "image": {"type": "string", "description": "base64 PNG/JPEG bytes"},
                        "k": {"type": "integer", "default": 10, "minimum": 1},
                        "modality": {"type": "string", "enum": list(MODALITIES)},
                        "dedup": {"type": "number", "nullable": True},
                    },
                    "additionalProperties": False,
                },
                "example": {"text": "a red circle", "k": 5, "modality": "image"},
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "default": 10},
                        "modality": {"type": "string", "enum": list(MODALITIES)},
                        "dedup": {"type": "number"},
                    },
                    "required": ["file"],
                }
            },
        },
    }
}


# --- running it ---------------------------------------------------------------------------------


def _warn_if_public(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: reachable from other machines, with no authentication", host)


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol plus a header timeout: a connection that has not sent a request's
    complete headers `header_timeout_s` after it opened (or after its last response) is closed.
    uvicorn's keep-alive timer alone does not cover this: any byte, however slow, resets it."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.scope  # a new request's scope replaces it once headers are in
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info(
                "closing a connection that sent no complete request headers in %g s",
                self.header_timeout_s,
            )
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.scope is not self._armed_for:
            self._disarm()  # headers complete; the body has its own timeout (_BodyLimit)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # before super(): it may start a pipelined request at once
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def uvicorn_config(
    app: FastAPI, *, host: str, port: int, log_level: str = "info"
) -> uvicorn.Config:
    """uvicorn settings from the app's `Limits`: header/body/keep-alive timeouts and the
    connection limit (uvicorn answers 503 beyond it)."""
    limits: Limits = app.state.limits
    protocol = type("TimedH11", (_TimedH11,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits = Limits(),
    allow_hosts: Sequence[str] = (),
) -> None:
    """Open the index in `index_dir` and serve it (blocking) on http://host:port. Requests must
    name the server in their Host header (`host_names(host, allow_hosts)`)."""
    from polysense.index import EmbeddingIndex

    if not 1 <= port <= 65535:
        raise PolysenseError(f"--port {port} is not a TCP port; use 1..65535 (e.g. 8000)")
    index = EmbeddingIndex.open(index_dir)
    _warn_if_public(host)
    app = create_app(index, limits=limits, allowed_hosts=host_names(host, allow_hosts))
    uvicorn.Server(uvicorn_config(app, host=host, port=port)).run()


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", timeout: float = 20.0
) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread on a free port, with the same settings
    as `serve`; yields its base URL and shuts the server down on exit (tests and notebooks)."""
    # IPPROTO_TCP as in uvicorn's own sockets: asyncio sets TCP_NODELAY only on those, and
    # without it every response stalls ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn_config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise PolysenseError(f"the server did not start on {host} within {timeout} s")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
