"""Abuse a `polysense serve` process on loopback and report what the issue measures.

While one client keeps sending text queries, 32 concurrent uploads of a 4096 x 4096 PNG and
8 JSON bodies of 7.7 MB `[[],[],...]` hit the server. Prints the good queries' p50/p99, the
statuses, and the server's idle and peak RSS (VmHWM, Linux /proc).

    python examples/serve_abuse.py --index runs/index [-- --limit max_decodes=1 ...]

Everything after `--` goes to `polysense serve`. Loopback only; bounded to 120 s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def rss_mib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


async def good(client: httpx.AsyncClient, stop: asyncio.Event) -> list[float]:
    took: list[float] = []
    while not stop.is_set() or len(took) < 50:
        start = time.perf_counter()
        await client.post("/search", json={"text": "a red circle", "k": 5})
        took.append(time.perf_counter() - start)
        await asyncio.sleep(0.02)
    return took


async def abuse(url: str, upload: bytes, flood: bytes) -> tuple[list[float], list[int]]:
    pool = httpx.Limits(max_connections=64)
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as calm,
        httpx.AsyncClient(base_url=url, timeout=60, limits=pool) as rough,
    ):
        await calm.post("/search", json={"text": "warm up", "k": 1})
        stop = asyncio.Event()
        task = asyncio.create_task(good(calm, stop))
        await asyncio.sleep(0.3)
        uploads = [
            rough.post("/search", files={"file": ("big.png", upload, "image/png")})
            for _ in range(32)
        ]
        headers = {"content-type": "application/json"}
        floods = [rough.post("/search", content=flood, headers=headers) for _ in range(8)]
        responses = await asyncio.gather(*uploads, *floods)
        stop.set()
        return await task, [r.status_code for r in responses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="an index directory (polysense index build)")
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "polysense.cli", "serve", "--index", args.index]
    server = subprocess.Popen(
        [*cmd, "--port", str(port), *serve_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        buf = io.BytesIO()
        Image.new("RGB", (4096, 4096), (200, 30, 30)).save(buf, "PNG")
        flood = b"[" + b"[]," * 2_560_000 + b"[]]"
        idle = rss_mib(server.pid, "VmRSS")
        took, statuses = asyncio.run(asyncio.wait_for(abuse(url, buf.getvalue(), flood), 120))
        up, fl = statuses[:32], statuses[32:]
        print(
            f"good queries: {len(took)}, p50 {np.median(took) * 1000:.0f} ms, "
            f"p99 {np.quantile(took, 0.99) * 1000:.0f} ms; "
            f"uploads: {up.count(200)} x 200, {up.count(503)} x 503, {up.count(500)} x 500; "
            f"floods: {sorted(set(fl))}; "
            f"server RSS idle {idle} MiB, peak {rss_mib(server.pid, 'VmHWM')} MiB"
        )
    finally:
        server.terminate()
        server.wait(15)


if __name__ == "__main__":
    main()
