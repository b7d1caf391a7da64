"""Abuse a `polysense serve` process on loopback and report what issue 21 measures.

While one client keeps sending text queries, 32 concurrent uploads of a 4096 x 4096 PNG (the
pixel limit: 59 KB on the wire, 50 MB decoded) and 8 JSON bodies of 7.7 MB `[[],[],...]` hit the
server. Prints the good queries' p50/p99, the statuses, and the server's idle and peak RSS (VmHWM,
from Linux /proc). `tests/test_serve_abuse.py` runs `run_abuse` and asserts the issue's bounds.

    python examples/serve_abuse.py --index runs/index [-- --limit max_decodes=1 ...]

Everything after `--` goes to `polysense serve`. Loopback only; bounded to 60 s of abuse.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

N_UPLOADS, N_FLOODS = 32, 8


@dataclass(frozen=True)
class AbuseResult:
    good_seconds: list[float]  # latency of each good text query
    good_statuses: list[int]
    upload_statuses: list[int]
    flood_statuses: list[int]
    idle_mib: int  # server RSS before the abuse
    peak_mib: int  # server peak RSS (VmHWM) after it
    health: dict  # GET /health after the abuse
    server_log: str  # the server's stderr

    def summary(self) -> str:
        took, up = self.good_seconds, self.upload_statuses
        return (
            f"good queries: {len(took)}, p50 {np.median(took) * 1000:.0f} ms, "
            f"p99 {np.quantile(took, 0.99) * 1000:.0f} ms; "
            f"uploads: {up.count(200)} x 200, {up.count(503)} x 503, {up.count(500)} x 500; "
            f"floods: {sorted(set(self.flood_statuses))}; "
            f"server RSS idle {self.idle_mib} MiB, peak {self.peak_mib} MiB"
        )


def rss_mib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


async def _good(client: httpx.AsyncClient, stop: asyncio.Event) -> tuple[list[float], list[int]]:
    took: list[float] = []
    statuses: list[int] = []
    while not stop.is_set() or len(took) < 50:
        start = time.perf_counter()
        r = await client.post("/search", json={"text": "a red circle", "k": 5})
        took.append(time.perf_counter() - start)
        statuses.append(r.status_code)
        await asyncio.sleep(0.02)
    return took, statuses


async def _abuse(url: str, upload: bytes, flood: bytes) -> tuple[list[float], list[int], list[int]]:
    pool = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as calm,
        httpx.AsyncClient(base_url=url, timeout=30, limits=pool) as rough,
    ):
        await calm.post("/search", json={"text": "warm up", "k": 1})
        stop = asyncio.Event()
        task = asyncio.create_task(_good(calm, stop))
        await asyncio.sleep(0.3)  # good queries are flowing before the abuse starts
        uploads = [
            rough.post("/search", files={"file": ("big.png", upload, "image/png")})
            for _ in range(N_UPLOADS)
        ]
        headers = {"content-type": "application/json"}
        floods = [rough.post("/search", content=flood, headers=headers) for _ in range(N_FLOODS)]
        responses = await asyncio.gather(*uploads, *floods)
        stop.set()
        took, good_statuses = await task
        return took, good_statuses, [r.status_code for r in responses]


def run_abuse(index_dir: str | Path, *, serve_args: tuple[str, ...] = ()) -> AbuseResult:
    """Start `polysense serve --index index_dir` on a free loopback port, abuse it, stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "polysense.cli", "serve", "--index", str(index_dir)]
    server = subprocess.Popen(
        [*cmd, "--port", str(port), *serve_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 30 s") from None
                time.sleep(0.2)
        buf = io.BytesIO()
        Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buf, "PNG")
        flood = b"[" + b"[]," * 2_560_000 + b"[]]"  # 7.7 MB
        idle = rss_mib(server.pid, "VmRSS")
        took, good, statuses = asyncio.run(asyncio.wait_for(_abuse(url, buf.getvalue(), flood), 60))
        peak = rss_mib(server.pid, "VmHWM")
        health = httpx.get(url + "/health", timeout=5).json()
    finally:
        server.terminate()
        try:
            _, log = server.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            _, log = server.communicate()
    return AbuseResult(
        good_seconds=took,
        good_statuses=good,
        upload_statuses=statuses[:N_UPLOADS],
        flood_statuses=statuses[N_UPLOADS:],
        idle_mib=idle,
        peak_mib=peak,
        health=health,
        server_log=log,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index directory (polysense index build)")
    args, serve_args = parser.parse_known_args()
    result = run_abuse(args.index, serve_args=tuple(a for a in serve_args if a != "--"))
    print(result.summary())


if __name__ == "__main__":
    main()
