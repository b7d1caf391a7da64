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
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

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
    """What one request may carry; anything larger is refused before it is decoded."""

    max_image_bytes: int = 5 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 1000
    max_k: int = 100
    max_body_bytes: int = 8 * 1024 * 1024  # base64 of a 5 MiB image is 6.7 MiB

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_text_chars", "max_k"):
            if getattr(self, name) < 1:
                raise PolysenseError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_body_bytes < self.max_image_bytes:
            raise PolysenseError(
                f"Limits.max_body_bytes ({self.max_body_bytes}) must be >= max_image_bytes "
                f"({self.max_image_bytes}), or no image of the allowed size could be uploaded"
            )


@dataclass(frozen=True)
class Batching:
    """Micro-batching of queries: each model call takes up to `max_items` queries, namely all
    that queued while the previous call ran, then waits up to `max_wait_ms` for more (0: no
    extra wait, so a lone query is never delayed and concurrent ones still share calls)."""

    max_items: int = 32
    max_wait_ms: float = 0.0


class ApiError(PolysenseError):
    """A request the service refuses: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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


# --- request parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchQuery:
    """One validated /search request: exactly one of `text` and `image`."""

    text: str | None
    image: Image.Image | None
    k: int
    modality: str
    dedup: float | None
    image_bytes: int = 0


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
        return image.convert("RGB")
    except Exception as exc:  # truncated file, corrupt stream
        raise ApiError(422, f"image could not be decoded ({exc}); is the file complete?") from None


async def _json_query(body: bytes, limits: Limits) -> SearchQuery:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise ApiError(400, f"the body is not valid JSON ({exc}); send e.g. {_EXAMPLE}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object like {_EXAMPLE}")
    unknown = sorted(set(data) - set(JSON_FIELDS))
    if unknown:
        raise ApiError(
            422, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(JSON_FIELDS)}"
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
    raw = decode_base64(data["image"], limits)
    image = await asyncio.to_thread(load_image, raw, limits)
    return SearchQuery(None, image, k, modality, dedup, len(raw))


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
                f"unknown form field(s) {', '.join(unknown)}; allowed: {', '.join(FORM_FIELDS)}",
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "the multipart form needs a `file` field holding the image file")
        k = _form_number(form.get("k"), "k", int)
        k = check_k(10 if k is None else k, limits)
        modality = check_modality(form.get("modality", "image"))
        dedup = check_dedup(_form_number(form.get("dedup"), "dedup", float))
        raw = await upload.read()
    finally:
        await form.close()
    image = await asyncio.to_thread(load_image, raw, limits)
    return SearchQuery(None, image, k, modality, dedup, len(raw))


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
    Content-Length header (a chunked upload is counted as it arrives)."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app = app
        self.limit = limit

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
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, message)
            return event

        await self.app(scope, limited, send)


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
        else:
            emb = model.encode_image([q.image for q in queries])  # (B, D)
    emb = emb.float().cpu().numpy()
    return [
        index.search(emb[i : i + 1], k=q.k, modality=q.modality, dedup=q.dedup)[0]
        for i, q in enumerate(queries)
    ]


def _image_url(key: str) -> str:
    return f"/items/{quote(key, safe='')}/image"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(
    index: EmbeddingIndex,
    *,
    limits: Limits = Limits(),
    batching: Batching = Batching(),
) -> FastAPI:
    """The search service over `index` (an opened `EmbeddingIndex`; its `.model` encodes queries).

    The model runs in one worker thread (torch parallelises inside a call; a batch at a time
    keeps memory flat); index reads (thread-safe) run in the default thread pool, so neither
    blocks the event loop."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polysense-model")
    index.model  # noqa: B018  (loads the checkpoint now: a broken one fails at start, not per query)
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
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(PolysenseError)
    async def _polysense_error(request: Request, exc: PolysenseError) -> JSONResponse:
        return _error(422, str(exc))

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

    @app.post("/search", openapi_extra=_SEARCH_OPENAPI)
    async def search(request: Request) -> JSONResponse:
        """Nearest items to a text or an image query (JSON, or a multipart `file` upload)."""
        start = time.perf_counter()
        query = await parse_search(request, limits)
        if query.text is not None:
            hits = await batchers["text"].submit(query)  # fewer than k when the index holds fewer
            described: dict[str, Any] = {"text": query.text}
        else:
            hits = await batchers["image"].submit(query)
            assert query.image is not None
            width, height = query.image.size
            described = {"image": {"width": width, "height": height, "bytes": query.image_bytes}}
        described.update(k=query.k, modality=query.modality, dedup=query.dedup)
        results = [
            {
                "key": hit.key,
                "score": round(float(hit.score), 6),
                "caption": hit.caption,
                "modality": hit.modality,
                "image_url": _image_url(hit.key),
            }
            for hit in hits
        ]
        took_ms = round((time.perf_counter() - start) * 1000, 2)
        return JSONResponse({"query": described, "results": results, "took_ms": took_ms})

    @app.get("/items/{key:path}/image", response_class=Response)
    async def item_image(key: str) -> Response:
        """The item's image as PNG."""
        data = await asyncio.to_thread(index.image_bytes, key)
        if data is None:
            if await asyncio.to_thread(index.item, key) is None:
                raise ApiError(404, f"no item with key {key!r} in this index")
            raise ApiError(404, f"item {key!r} has no image")
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{key:path}")
    async def item(key: str) -> JSONResponse:
        """The item's metadata: key, captions, source, split."""
        meta = await asyncio.to_thread(index.item, key)
        if meta is None:
            raise ApiError(404, f"no item with key {key!r} in this index")
        return JSONResponse({**meta, "image_url": _image_url(key)})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the index size and dimension, the request limits and batching counters."""
        return {
            "status": "ok",
            "items": len(index),
            "dim": int(index.dim),
            "limits": {**limits.__dict__},
            "batches": {m: {"calls": b.calls, "items": b.items} for m, b in batchers.items()},
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


def serve(
    index_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits = Limits(),
) -> None:
    """Open the index in `index_dir` and serve it (blocking) on http://host:port."""
    from polysense.index import EmbeddingIndex

    index = EmbeddingIndex.open(index_dir)
    _warn_if_public(host)
    uvicorn.run(create_app(index, limits=limits), host=host, port=port, log_level="info")


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, *, host: str = "127.0.0.1", timeout: float = 20.0
) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread on a free port; yields its base URL and
    shuts the server down on exit (for tests and notebooks)."""
    # IPPROTO_TCP as in uvicorn's own sockets: asyncio sets TCP_NODELAY only on those, and
    # without it every response stalls ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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
