"""The search service: answers checked against the index library itself, 30 kinds of malformed
request (each a 4xx with a message, the server answering the next good request), micro-batching
under concurrency, and a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import base64
import inspect
import io
import json
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from helpers import make_pairs, tiny_config
from polysense.errors import PolysenseError
from polysense.index import EmbeddingIndex, build_index
from polysense.serve.app import (
    Batching,
    Limits,
    MicroBatcher,
    create_app,
    serve,
    serve_in_thread,
)
from polysense.train.loop import train

N_ITEMS = 24
RESULT_FIELDS = {"key", "score", "caption", "modality", "image_path", "image_url"}


def make_index(root: Path) -> EmbeddingIndex:
    """A real index: a tiny CLIP trained for 30 steps (so that embeddings differ: a random one
    maps every image to nearly one point) over 24 coloured circles and squares."""
    torch.manual_seed(0)
    pairs = make_pairs(root / "data", N_ITEMS)
    cfg = tiny_config("clip-tiny", "train.steps=30", "train.lr=3e-3")
    train(cfg, data=pairs, out=root / "ckpt", progress=False)
    return build_index(root / "ckpt", pairs, root / "index", progress=False)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> EmbeddingIndex:
    return make_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index), raise_server_exceptions=False) as c:
        yield c


def first_key(index: EmbeddingIndex) -> str:
    return index.search_text(["a red circle"], k=1)[0][0].key


def png_of(index: EmbeddingIndex, key: str) -> bytes:
    data = index.image_bytes(key)
    assert data is not None
    return data


def png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_same_ranking(results: list[dict], expected: list[dict], atol: float = 1e-5) -> None:
    """Same scores (to `atol`) and, at each rank, a key the other side has at a score within
    `atol` (two paths may order exact or 1e-7 ties differently)."""
    got, want = [r["score"] for r in results], [r["score"] for r in expected]
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    for r in results:
        tied = {e["key"] for e in expected if abs(e["score"] - r["score"]) <= atol}
        assert r["key"] in tied, (r, expected)


def assert_same_hits(results: list[dict], hits: list) -> None:
    """Service results against the library's own `Hit`s: same items, captions, order, scores."""
    expected = [{"key": h.key, "score": h.score} for h in hits]
    assert_same_ranking(results, expected)
    captions = {h.key: h.caption for h in hits} if hits and hits[0].modality == "image" else None
    for r, h in zip(results, hits, strict=True):
        assert r["modality"] == h.modality
        if captions is not None:
            assert r["caption"] == captions[r["key"]]
        elif r["key"] == h.key:
            assert r["caption"] == h.caption


# --- good requests --------------------------------------------------------------------------------


def test_health_reports_the_index(client, index):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["items"] == len(index) == N_ITEMS
    assert body["dim"] == index.dim == 32


def test_text_search_returns_the_library_results(client, index):
    response = client.post("/search", json={"text": "a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == {"text": "a red circle", "k": 5, "modality": "image", "dedup": None}
    assert body["took_ms"] >= 0
    assert all(set(r) == RESULT_FIELDS for r in body["results"])
    assert all(r["image_url"] == f"/items/{r['key']}/image" for r in body["results"])
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert_same_hits(body["results"], index.search_text(["a red circle"], k=5)[0])


def test_results_name_the_image_file_relative_to_the_source(client, index):
    """Every result names its image file as make_pairs wrote it ("7.png" beside pairs.jsonl),
    relative to the indexed source's folder, and that file is the image the index holds."""
    data = Path(index.meta["sources"][0]["data"]).parent
    for modality in ("image", "text"):
        body = client.post("/search", json={"text": "a red circle", "k": 6, "modality": modality})
        for r in body.json()["results"]:
            assert not Path(r["image_path"]).is_absolute()
            assert r["image_path"] == r["key"] and r["image_path"].endswith(".png")
            on_disk = np.asarray(Image.open(data / r["image_path"]).convert("RGB"))
            stored = np.asarray(Image.open(io.BytesIO(index.image_bytes(r["key"]))))
            np.testing.assert_array_equal(on_disk, stored)


def test_text_to_text_and_dedup_follow_the_library(client, index):
    body = client.post("/search", json={"text": "a blue square", "k": 8, "modality": "text"}).json()
    assert {r["modality"] for r in body["results"]} == {"text"}
    assert_same_hits(body["results"], index.search_text(["a blue square"], k=8, modality="text")[0])
    deduped = client.post("/search", json={"text": "a blue square", "k": 8, "dedup": 0.9}).json()
    hits = index.search_text(["a blue square"], k=8, dedup=0.9)[0]
    assert_same_hits(deduped["results"], hits)
    emb = index.embeddings("image")[[h.row for h in hits]]  # (n, D)
    sim = emb @ emb.T
    assert (sim[~np.eye(len(hits), dtype=bool)] < 0.9).all()  # no kept pair above the threshold


def test_k_larger_than_the_index_returns_every_item(client, index):
    body = client.post("/search", json={"text": "a shape", "k": 100}).json()
    keys = [r["key"] for r in body["results"]]
    assert len(keys) == len(set(keys)) == N_ITEMS
    assert all(index.item(key) is not None for key in keys)


def test_image_query_finds_itself_base64_and_multipart(client, index):
    key = first_key(index)
    data = png_of(index, key)
    by_json = client.post("/search", json={"image": b64(data), "k": 3}).json()
    data_url = "data:image/png;base64," + b64(data)
    by_url = client.post("/search", json={"image": data_url, "k": 3}).json()
    by_form = client.post(
        "/search",
        files={"file": ("q.png", data, "image/png")},
        data={"k": "3", "modality": "image"},
    ).json()
    expected = index.search_image([Image.open(io.BytesIO(data)).convert("RGB")], k=3)[0]
    for body in (by_json, by_url, by_form):
        assert body["query"]["image"] == {"width": 32, "height": 32, "bytes": len(data)}
        assert_same_hits(body["results"], expected)
        assert body["results"][0]["key"] == key  # its own image, at cosine 1
        assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_items_metadata_and_image(client, index):
    key = first_key(index)
    meta = client.get(f"/items/{key}").json()
    assert meta["captions"] == index.item(key)["captions"]
    assert meta["image_url"] == f"/items/{key}/image"
    response = client.get(f"/items/{key}/image")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == index.image_bytes(key)
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)


def test_page_and_its_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        assert client.get(asset).status_code == 200
    for name in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(name).text
        assert "http://" not in text and "https://" not in text, f"{name} loads a remote asset"
    assert 'for="query-text"' in html and 'for="image-file"' in html  # labelled controls
    assert client.get("/openapi.json").json()["paths"]["/search"]["post"]


def test_serve_binds_loopback_by_default():
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


def test_limits_are_validated():
    with pytest.raises(PolysenseError, match="max_k"):
        Limits(max_k=0)
    with pytest.raises(PolysenseError, match="max_body_bytes"):
        Limits(max_body_bytes=10, max_image_bytes=100)


# --- bad requests ---------------------------------------------------------------------------------


def chunked(total: int, size: int = 1 << 20):
    """A body streamed in chunks with no Content-Length."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def raw(body: bytes | Iterator[bytes], content_type: str | None = "application/json") -> dict:
    """httpx arguments for a body sent as is."""
    return {"content": body, "headers": {"content-type": content_type} if content_type else {}}


def bad_requests(index: EmbeddingIndex) -> list[tuple[str, dict, int]]:
    """(name, httpx request arguments, expected status)."""
    good = png_of(index, first_key(index))
    limits = Limits()
    form = {"file": ("q.png", good, "image/png")}
    return [
        ("invalid json", raw(b'{"text": '), 400),
        ("empty body", raw(b""), 400),
        ("empty body, no type", raw(b"", None), 400),
        ("not utf-8", raw(b'{"text": "\xff\xfe"}'), 400),
        ("nested too deep", raw(b"[" * 100_000), 413),  # refused by a byte count, unparsed
        ("nested, under the count", raw(b"[" * 1000), 400),
        ("a million empty lists", raw(b"[" + b"[]," * 1_000_000 + b"[]]"), 413),
        ("lone surrogate in text", raw(b'{"text": "a \\ud800"}'), 422),
        ("lone surrogate in a key", raw(b'{"\\udc00": 1, "text": "a"}'), 422),
        ("json array", {"json": ["a red circle"]}, 422),
        ("neither text nor image", {"json": {"k": 5}}, 422),
        ("both text and image", {"json": {"text": "a", "image": b64(good)}}, 422),
        ("unknown field", {"json": {"txt": "a red circle"}}, 422),
        ("text not a string", {"json": {"text": 42}}, 422),
        ("empty text", {"json": {"text": "   "}}, 422),
        ("text too long", {"json": {"text": "a" * (limits.max_text_chars + 1)}}, 422),
        ("bad base64", {"json": {"image": "!!not*base64!!"}}, 422),
        ("base64 of non-image bytes", {"json": {"image": b64(b"hello, I am text")}}, 422),
        ("truncated png", {"json": {"image": b64(good[: len(good) // 2])}}, 422),
        ("too many bytes", {"json": {"image": b64(bytes(limits.max_image_bytes + 1))}}, 413),
        ("too many pixels", {"json": {"image": b64(png(4097, 4097))}}, 413),
        ("decompression bomb", {"json": {"image": b64(bomb_png(30_000, 30_000))}}, 413),
        ("body over the limit", raw(b"x" * (limits.max_body_bytes + 1)), 413),
        ("chunked body over the limit", raw(chunked(limits.max_body_bytes + 1)), 413),
        ("k=0", {"json": {"text": "a", "k": 0}}, 422),
        ("k=10**6", {"json": {"text": "a", "k": 10**6}}, 422),
        ("k a string", {"json": {"text": "a", "k": "5"}}, 422),
        ("k a float", {"json": {"text": "a", "k": 2.5}}, 422),
        ("k a bool", {"json": {"text": "a", "k": True}}, 422),
        ("unknown modality", {"json": {"text": "a", "modality": "audio"}}, 422),
        ("dedup out of range", {"json": {"text": "a", "dedup": 1.5}}, 422),
        ("dedup NaN", raw(b'{"text": "a", "dedup": NaN}'), 422),
        ("a JSON string, not an object", raw(json.dumps('{"text": "a"}').encode()), 422),
        ("wrong content type", raw(b'{"text": "a"}', "text/plain"), 415),
        ("multipart without file", {"files": {"k": (None, "3")}}, 422),
        ("multipart unknown field", {"files": {**form, "x": (None, "1")}}, 422),
        ("multipart two files", {"files": {**form, "modality": ("m", b"text")}}, 400),
        (
            "multipart non-image file",
            {"files": {"file": ("a.png", b"not a png", "image/png")}},
            422,
        ),
        ("multipart k not an int", {"files": form, "data": {"k": "abc"}}, 422),
        ("multipart without boundary", raw(b"--x\r\n", "multipart/form-data"), 400),
    ]


def test_malformed_requests_get_4xx_with_a_message_and_the_server_keeps_answering(client, index):
    cases = bad_requests(index)
    assert len(cases) >= 20
    seen = {}
    for name, kwargs, status in cases:
        response = client.post("/search", **kwargs)
        body = response.json()
        seen[name] = (response.status_code, body.get("error"))
        assert response.status_code == status, (name, response.status_code, body)
        assert isinstance(body["error"], str) and len(body["error"]) > 10, (name, body)
        follow = client.post("/search", json={"text": "a red circle", "k": 2})
        assert follow.status_code == 200 and len(follow.json()["results"]) == 2, name
    assert "k=0" in seen["k=0"][1] and "1 <= k <= 100" in seen["k=0"][1]
    assert "4097x4097" in seen["too many pixels"][1]
    assert "base64" in seen["bad base64"][1]


def test_bad_item_and_route_requests(client):
    for path in ("/items/no-such-key", "/items/no-such-key/image"):
        response = client.get(path)
        assert response.status_code == 404
        assert "no-such-key" in response.json()["error"]
    response = client.get("/search")
    assert response.status_code == 405 and "GET" in response.json()["error"]
    assert "/nowhere" in client.get("/nowhere").json()["error"]


# --- batching ---------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_match_sequential(index):
    app = create_app(index, batching=Batching(max_items=32, max_wait_ms=100))
    texts = ["a red circle", "a blue square", "a green circle", "a yellow square", "red", "blue"]
    images = [png_of(index, h.key) for h in index.search_text(["a shape"], k=4)[0]]

    def requests() -> list[dict]:
        return [{"json": {"text": t, "k": 5}} for t in texts] + [
            {"json": {"image": b64(data), "k": 5}} for data in images
        ]

    async def go() -> tuple[list[dict], list[dict], dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            sequential = [(await c.post("/search", **r)).json() for r in requests()]
            before = (await c.get("/health")).json()["batches"]
            together = await asyncio.gather(*(c.post("/search", **r) for r in requests()))
            after = (await c.get("/health")).json()["batches"]
        calls = {m: after[m]["calls"] - before[m]["calls"] for m in after}
        items = {m: after[m]["items"] - before[m]["items"] for m in after}
        return sequential, [r.json() for r in together], {"calls": calls, "items": items}

    sequential, together, counts = asyncio.run(go())
    assert counts["items"] == {"text": len(texts), "image": len(images)}
    assert counts["calls"]["text"] < len(texts)  # shared model calls
    assert counts["calls"]["image"] < len(images)
    for a, b in zip(sequential, together, strict=True):
        assert_same_ranking(b["results"], a["results"])


def test_one_failing_query_does_not_fail_its_batch():
    from concurrent.futures import ThreadPoolExecutor

    calls = []

    def encode(items: list[str]) -> np.ndarray:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("cannot encode 'bad'")
        return np.array([[len(x)] for x in items], dtype=np.float32)  # (B, 1)

    async def go() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(answer=encode, batching=Batching(max_wait_ms=50), executor=pool)
            out = await asyncio.gather(
                *(batcher.submit(x) for x in ["a", "bad", "ccc"]), return_exceptions=True
            )
            await batcher.stop()
            return out

    a, bad, c = asyncio.run(go())
    assert a.tolist() == [1.0] and c.tolist() == [3.0]
    assert isinstance(bad, ValueError)
    assert calls[0] == ["a", "bad", "ccc"]  # batched first, then retried one by one
    assert sorted(map(tuple, calls[1:])) == [("a",), ("bad",), ("ccc",)]


# --- a real server --------------------------------------------------------------------------------


def test_real_uvicorn_on_loopback(index):
    app = create_app(index)
    with serve_in_thread(app) as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/health").json()["items"] == N_ITEMS
            body = http.post("/search", json={"text": "a red circle", "k": 3}).json()
            assert_same_hits(body["results"], index.search_text(["a red circle"], k=3)[0])
            image = http.get(body["results"][0]["image_url"])
            assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
            bad = http.post("/search", json={"text": "a", "k": 0})
            assert bad.status_code == 422 and "k=0" in bad.json()["error"]
            big = http.post("/search", content=b"x" * (Limits().max_body_bytes + 1))
            assert big.status_code == 413
            assert http.post("/search", json={"text": "a red circle", "k": 1}).status_code == 200
        port = int(url.rsplit(":", 1)[1])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the server is shut down
