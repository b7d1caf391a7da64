"""The embedding index: memory-mapped embeddings, faiss indexes and a SQLite item store.

Layout of an index directory (format version 1):

    meta.json       format, version, checkpoint (absolute path, or a preset name) with the sha256
                    of its weights, model name, dim, counts, per-modality index parameters, the
                    sources added; written last, so its presence marks a complete index
    image_emb.f32   float32 (N, D), raw, row i = item row i; memory-mapped on open
    text_emb.f32    float32 (M, D), raw, row j = caption row j
    image.faiss     faiss index over image_emb (faiss ids = item rows)
    text.faiss      faiss index over text_emb (faiss ids = caption rows)
    items.sqlite    items(row, key, captions JSON, source, split, extra JSON, image PNG BLOB) and
                    texts(row, item_row, caption)
    rejects.jsonl   samples skipped by the last build or add, one JSON object a line

A live index is never written in place: `build_index` and `EmbeddingIndex.add` write a temporary
sibling directory and swap it in with renames (live -> `.NAME.old`, new -> `NAME`, old removed).
A process killed at any point leaves the previous index usable; `open` finishes or rolls back a
swap cut between its two renames, and removes the temporary directories of killed writers
(`.NAME.tmp-XXXXXXXX`, see `polysense.fileio.remove_stale`: unlocked and a minute old; a live
writer holds a lock on its own). One writer at a time. A write that fails for lack of space
or permission (SQLite's "database or disk is full" included) is a one-line error.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from polysense.errors import DataError, PolysenseError
from polysense.fileio import remove_stale, temp_dir, write_failure
from polysense.index import ann
from polysense.index.embed import EmbeddedBatch, EmbedOptions, check_options, embed_files

FORMAT, VERSION = "polysense-index", 1
META, ITEMS_DB, REJECTS = "meta.json", "items.sqlite", "rejects.jsonl"
MODALITIES = ("image", "text")
MAX_K = 1000
DEDUP_FETCH = 4  # dedup searches DEDUP_FETCH * k candidates, growing by this factor if short
DEDUP_MAX_CANDIDATES = 16_384
IMAGE_MAX_SIDE = 512  # stored PNGs are downscaled to this side (the world's are 32 px)
_NOT_EXTRA = frozenset(
    {"key", "source", "image", "text", "audio", "sample_rate", "video", "ocr_image"}
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, captions TEXT NOT NULL,
    source TEXT, split TEXT, extra TEXT NOT NULL, image BLOB);
CREATE TABLE IF NOT EXISTS texts (
    row INTEGER PRIMARY KEY, item_row INTEGER NOT NULL REFERENCES items(row), caption TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS texts_item_row ON texts(item_row);
"""


@dataclass(frozen=True)
class Hit:
    """One search result. `row` indexes the searched modality (item row for an image hit, caption
    row for a text hit); `caption` is the item's first caption for an image hit and the matched
    caption for a text hit (None for an image without captions); `image_path` is where the
    item's image file is, relative to the folder of the source it was read from."""

    key: str
    score: float
    caption: str | None
    modality: str
    row: int
    image_path: str | None = None  # the image file, relative to the source's folder (None: a tar)


def _emb_file(modality: str) -> str:
    return f"{modality}_emb.f32"


def _faiss_file(modality: str) -> str:
    return f"{modality}.faiss"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------ directory swap and recovery


def _old_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def _is_index(path: Path) -> bool:
    return (path / META).is_file()


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def recover(out: str | Path) -> None:
    """Finish or roll back a swap that a killed process left between its two renames, and
    remove the stale temporary directories of killed builds or adds of this index."""
    out = Path(out)
    remove_stale(out.parent, re.compile(re.escape(_temp_prefix(out)) + r"[a-z0-9_]{8}"))
    old = _old_dir(out)
    if not old.exists():
        return
    if _is_index(out):
        shutil.rmtree(old, ignore_errors=True)  # the new index is in place: drop the old one
    elif _is_index(old) and (not out.exists() or not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.rename(old, out)  # the new index never arrived: the old one comes back


def _check_out(out: Path) -> None:
    """Refuse to replace anything that is not an index (a typo'd --out must not wipe a folder)."""
    if out.exists() and not out.is_dir():
        raise PolysenseError(f"{out} is a file; --out must name a directory for the index")
    if out.is_dir() and any(out.iterdir()) and not _is_index(out):
        raise PolysenseError(
            f"{out} exists and is not a polysense index (no {META}); refusing to replace it: "
            "choose another --out or remove that directory"
        )


def _finish_files(directory: Path) -> None:
    """Flush every file to disk; make the directory readable like any other (mkdtemp's is 0700)."""
    os.chmod(directory, 0o755)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o644)
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the complete directory `tmp` with renames; `out` may not exist."""
    _finish_files(tmp)
    recover(out)
    old = _old_dir(out)
    if old.exists():
        shutil.rmtree(old)  # not an index (recover kept it): nothing to keep
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _temp_sibling(out: Path) -> Iterator[Path]:
    """A locked temporary directory beside `out` to write the new index in (removed after the
    block unless swapped in); a write failing for lack of space or permission is one line."""
    try:
        with temp_dir(out.parent, _temp_prefix(out)) as tmp:
            yield tmp
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        failure = write_failure(exc, out)
        if failure is None:
            raise
        raise failure from None


# ------------------------------------------------------------------ checkpoints


def _fingerprint(ckpt: str) -> str | None:
    """sha256 of a checkpoint directory's weights (None for a preset name)."""
    path = Path(ckpt)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            digest = hashlib.sha256()
            with open(path / name, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()
    return None


def _model_name(ckpt: str) -> str:
    config = Path(ckpt) / "config.json"
    if not config.is_file():
        return ckpt  # a preset name
    data = json.loads(config.read_text())
    return f"hf:{data['model_type']}" if "model_type" in data else str(data.get("name", ""))


def _checkpoint_ref(ckpt: str | Path) -> str:
    """A directory as an absolute path; a preset name as is."""
    return str(Path(ckpt).resolve()) if Path(ckpt).is_dir() else str(ckpt)


# ------------------------------------------------------------------ writing samples


def _png(image: Image.Image) -> bytes:
    if max(image.size) > IMAGE_MAX_SIDE:
        image = image.copy()
        image.thumbnail((IMAGE_MAX_SIDE, IMAGE_MAX_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_root(data: str | Path) -> Path:
    """The folder a source's file paths are given relative to: itself, or a file's folder."""
    path = Path(str(data))
    return path if path.is_dir() else path.parent


def _extra(sample: dict[str, Any], root: Path) -> str:
    """The sample's JSON-serialisable pass-through fields (objects, label, qa ...) as JSON; its
    `image_path` relative to `root`, the source's folder (never an absolute path)."""
    from polysense.data.readers import path_key

    out = {}
    if isinstance(sample.get("image_path"), str):
        sample = {**sample, "image_path": path_key(os.path.abspath(sample["image_path"]), root)}
    for name, value in sample.items():
        if name in _NOT_EXTRA:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[name] = value
    return json.dumps(out, ensure_ascii=False)


def _check_embeddings(emb: torch.Tensor, n: int, what: str) -> np.ndarray:
    arr = emb.detach().float().cpu().numpy()
    if arr.ndim != 2 or arr.shape[0] != n:
        raise PolysenseError(f"model.{what} returned {arr.shape} for {n} inputs; want ({n}, D)")
    if not np.isfinite(arr).all():
        raise PolysenseError(f"model.{what} returned NaN or inf: the checkpoint is broken")
    return np.ascontiguousarray(arr, dtype=np.float32)  # (n, D)


def _embed_texts(model: Any, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """(M,) strings -> (M, D) float32, in batches under inference mode."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            out.append(_check_embeddings(model.encode_text(chunk), len(chunk), "encode_text"))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _embed_images(model: Any, images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
    """PIL images -> (N, D) float32, in batches under inference mode."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + batch_size]]
            out.append(_check_embeddings(model.encode_image(chunk), len(chunk), "encode_image"))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class _Writer:
    """Appends samples to an index directory being written: embedding rows and SQLite rows."""

    def __init__(
        self,
        *,
        directory: Path,
        model: Any,
        dim: int | None,
        batch_size: int,
        rejects: Any,
        root: Path,
    ) -> None:  # batch_size: captions per text-tower call
        self.model, self.dim, self.batch_size, self.rejects = model, dim, batch_size, rejects
        self.root = Path(os.path.abspath(root))
        self.db = sqlite3.connect(directory / ITEMS_DB)
        self.db.executescript(_SCHEMA)
        self.n_items = self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        self.n_texts = self.db.execute("SELECT COUNT(*) FROM texts").fetchone()[0]
        self.files = {m: open(directory / _emb_file(m), "ab") for m in MODALITIES}  # noqa: SIM115
        self.added_items = self.added_texts = 0

    def close(self) -> None:
        self.db.commit()
        self.db.close()
        for fh in self.files.values():
            fh.close()

    def _reject(self, sample: dict[str, Any], reason: str, detail: str) -> None:
        key, source = str(sample.get("key")), str(sample.get("source", ""))
        self.rejects.add(key=key, reason=reason, source=source, detail=detail)

    def ingest(
        self,
        batches: Iterable[EmbeddedBatch],
        *,
        split: str | None,
        advance: Callable[[int], None],
    ) -> None:
        """Write each batch's samples with their image vectors; a sample without an image, or
        whose key is already in (or earlier in) the index, is rejected."""
        seen: set[str] = set()
        for batch in batches:
            for sample in batch.missing:
                detail = "the index holds images with their captions; this has none"
                self._reject(sample, "missing_image", detail)
            rows = []
            for i, sample in enumerate(batch.samples):
                key = sample.get("key")
                sql = "SELECT 1 FROM items WHERE key=?"
                if key in seen or self.db.execute(sql, (key,)).fetchone():
                    self._reject(sample, "duplicate_key", f"key {key!r} is already in the index")
                    continue
                seen.add(key)
                rows.append(i)
            if rows:
                vectors = torch.from_numpy(batch.vectors[rows])  # (n, D)
                image_emb = _check_embeddings(vectors, len(rows), "encode_image")
                self._write([batch.samples[i] for i in rows], image_emb, split)
                advance(len(rows))

    def _write(self, batch: list[dict[str, Any]], image_emb: np.ndarray, split: str | None) -> None:
        """Append samples (each with its PNG as "kept") and their image vectors (n, D)."""
        captions = [list(s.get("text") or []) for s in batch]
        flat = [c for caps in captions for c in caps]
        text_emb = _embed_texts(self.model, flat, self.batch_size)  # (M_b, D)
        dim = image_emb.shape[1]
        if self.dim is None:
            self.dim = dim
        if dim != self.dim or (len(flat) and text_emb.shape[1] != self.dim):
            raise PolysenseError(
                f"the model embeds into {dim} dimensions but the index holds {self.dim}; "
                "use the checkpoint the index was built with"
            )
        self.files["image"].write(image_emb.tobytes())
        self.files["text"].write(text_emb.tobytes())
        item_rows, text_rows = [], []
        for s, caps in zip(batch, captions, strict=True):
            row = self.n_items + len(item_rows)
            source = os.path.abspath(s["source"]) if s.get("source") else None
            item_split = s.get("split") if isinstance(s.get("split"), str) else split
            captions_json = json.dumps(caps, ensure_ascii=False)
            image = s["kept"]  # the PNG, made in a worker by _png
            extra = _extra({k: v for k, v in s.items() if k != "kept"}, self.root)
            item_rows.append((row, s["key"], captions_json, source, item_split, extra, image))
            start = self.n_texts + len(text_rows)
            text_rows += [(start + j, row, c) for j, c in enumerate(caps)]
        self.db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", item_rows)
        self.db.executemany("INSERT INTO texts VALUES (?, ?, ?)", text_rows)
        self.n_items += len(item_rows)
        self.n_texts += len(text_rows)
        self.added_items += len(item_rows)
        self.added_texts += len(text_rows)


def _ingest(
    directory: Path,
    model: Any,
    data: str | Path,
    *,
    dim: int | None,
    split: str | None,
    options: EmbedOptions,
    progress: bool,
    limit: int | None,
    image_root: str | Path | None = None,
) -> dict[str, Any]:
    """Read `data` into `directory` (appending); returns the source record for meta.json.
    Image paths are kept relative to `image_root`, else to the source's folder."""
    from polysense.data.readers import Rejects
    from polysense.eval.zeroshot import progress_bar

    with Rejects(directory / REJECTS) as rejects:
        writer = _Writer(
            directory=directory,
            model=model,
            dim=dim,
            batch_size=options.batch_size,
            rejects=rejects,
            root=Path(image_root) if image_root is not None else _data_root(data),
        )
        try:
            batches = embed_files(
                model,
                data,
                options=options,
                rejects=rejects,
                split=split,
                image_root=image_root,
                limit=limit,
                keep=_png,
            )
            with progress_bar(progress, f"embedding {data}") as advance:
                writer.ingest(batches, split=split, advance=advance)
        finally:
            writer.close()
    if writer.added_items == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in rejects.by_reason.items()) or "none"
        raise DataError(
            f"{data}: no sample with an image to index (split={split}; rejected by reason: "
            f"{reasons}); check --data and --split"
        )
    record = {"data": os.path.abspath(data), "split": split, "limit": limit, "at": _now()}
    if image_root is not None:
        record["image_root"] = os.path.abspath(image_root)
    counts = {"items": writer.added_items, "texts": writer.added_texts}
    return {**record, **counts, "rejected": rejects.count, "dim": writer.dim}


def _load_emb(path: Path, n: int, dim: int) -> np.ndarray:
    """The (n, dim) float32 memory map of a raw embedding file, checked against its size."""
    if not path.is_file():
        raise DataError(f"{path} is missing: the index is damaged; rebuild it")
    size, want = path.stat().st_size, n * dim * 4
    if size != want:
        raise DataError(
            f"{path} has {size} bytes, meta.json says {n} x {dim} float32 = {want}: the index is "
            "damaged; rebuild it"
        )
    if n == 0:
        return np.zeros((0, dim), np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, dim))


def _others(vectors: dict[str, np.ndarray], modality: str) -> np.ndarray:
    """The other modality's embeddings: the cross-modal queries an index is tuned for."""
    return vectors["text" if modality == "image" else "image"]


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    from polysense.fileio import atomic_write_json

    atomic_write_json(directory / META, meta)


def _check_common(batch_size: int, limit: int | None) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PolysenseError(f"batch_size={batch_size!r}: must be a positive integer")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise PolysenseError(f"limit={limit!r}: must be a positive integer (or None for all)")


# ------------------------------------------------------------------ build


def build_index(
    ckpt: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    index_type: str = "auto",
    batch_size: int = 256,
    progress: bool = True,
    limit: int | None = None,
    image_root: str | Path | None = None,
    device: str = "cpu",
    num_workers: int | None = None,
    compile: bool = False,
) -> EmbeddingIndex:
    """Embed the images and every caption of `data` with the model in `ckpt` and write an index
    directory at `out` (replacing an index already there only once the new one is complete).

    `index_type` "auto" picks exact search up to `ann.FLAT_MAX` vectors per modality, else IVF;
    "flat", "ivf", "hnsw" force one. Samples without an image and repeated keys are rejected to
    `out/rejects.jsonl`. `limit` reads at most that many samples; `image_root` is the folder
    the images of a COCO or Karpathy JSON are under. Images are decoded in `num_workers`
    DataLoader workers while the model embeds on `device` (None: `embed.auto_workers`);
    `compile` runs the image tower through torch.compile."""
    from polysense import load

    ann.choose_type(0, index_type)
    _check_common(batch_size, limit)
    options = EmbedOptions(
        device=device, batch_size=batch_size, num_workers=num_workers, compile=compile
    )
    torch_device, _ = check_options(options)
    faiss = ann.faiss_module()
    out = Path(out)
    recover(out)
    _check_out(out)
    model = load(ckpt, family="clip", device=str(torch_device))
    with _temp_sibling(out) as tmp:
        source = _ingest(
            tmp,
            model,
            data,
            dim=None,
            split=split,
            options=options,
            progress=progress,
            limit=limit,
            image_root=image_root,
        )
        dim = source.pop("dim")
        counts = {"items": source["items"], "texts": source["texts"]}
        sizes = {"image": counts["items"], "text": counts["texts"]}
        vectors = {m: _load_emb(tmp / _emb_file(m), n, dim) for m, n in sizes.items()}
        params = {}
        for modality, n in sizes.items():
            kind = ann.choose_type(n, index_type) if n > 0 else "flat"
            index, params[modality] = ann.build(
                vectors[modality], kind, cross_queries=_others(vectors, modality)
            )
            faiss.write_index(index, str(tmp / _faiss_file(modality)))
        del vectors
        ref = _checkpoint_ref(ckpt)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "checkpoint": ref,
            "checkpoint_sha256": _fingerprint(ref),
            "model_name": _model_name(ref),
            "dim": dim,
            "counts": counts,
            "index_type": index_type,
            "index": params,
            "sources": [source],
            "created": _now(),
            "updated": _now(),
        }
        _write_meta(tmp, meta)
        _swap_in(tmp, out)
    return EmbeddingIndex.open(out, model=model)


# ------------------------------------------------------------------ the index


def _read_meta(directory: Path) -> dict[str, Any]:
    hint = f"build one with `polysense index build --ckpt CKPT --data DATA --out {directory}`"
    if not directory.is_dir():
        raise DataError(f"{directory} does not exist or is not a directory; {hint}")
    path = directory / META
    if not path.is_file():
        raise DataError(f"{directory} is not a polysense index (no {META}); {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc}); the index is damaged, rebuild it"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path}: 'format' is not {FORMAT!r}; {directory} is not an index")
    if meta.get("version") != VERSION:
        raise DataError(
            f"{path}: index format version {meta.get('version')!r}, this polysense reads "
            f"{VERSION}; rebuild the index"
        )
    return meta


class EmbeddingIndex:
    """An index directory opened for search: use `EmbeddingIndex.open(dir)` or `build_index`.

    Safe to search from several threads (faiss searches read only; SQLite reads are locked)."""

    def __init__(self, *, directory: Path, meta: dict[str, Any], model: Any | None = None) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._load(directory, meta)

    def _load(self, directory: Path, meta: dict[str, Any]) -> None:
        faiss = ann.faiss_module()
        self.directory, self.meta = directory, meta
        self.dim = int(meta["dim"])
        counts = {"image": meta["counts"]["items"], "text": meta["counts"]["texts"]}
        self._emb = {m: _load_emb(directory / _emb_file(m), counts[m], self.dim) for m in counts}
        self._faiss = {}
        for m in MODALITIES:
            path = directory / _faiss_file(m)
            if not path.is_file():
                raise DataError(f"{path} is missing: the index is damaged; rebuild it")
            self._faiss[m] = faiss.read_index(str(path))
            if self._faiss[m].ntotal != counts[m]:
                raise DataError(f"{path} holds {self._faiss[m].ntotal} vectors, not {counts[m]}")
        db_path = directory / ITEMS_DB
        if not db_path.is_file():
            raise DataError(f"{db_path} is missing: the index is damaged; rebuild it")
        uri = db_path.resolve().as_uri() + "?mode=ro"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)

    @classmethod
    def open(cls, directory: str | Path, *, model: Any | None = None) -> EmbeddingIndex:
        """Open an index directory; `model` (a CLIP) saves loading the recorded checkpoint."""
        directory = Path(directory)
        recover(directory)
        return cls(directory=directory, meta=_read_meta(directory), model=model)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._emb["image"])

    @property
    def n_texts(self) -> int:
        return len(self._emb["text"])

    def embeddings(self, modality: str) -> np.ndarray:
        """The stored (N, D) float32 embeddings of a modality (read-only memory map)."""
        return self._emb[_check_modality(modality)]

    @property
    def model(self) -> Any:
        """The model of the recorded checkpoint, loaded on first use (or the one passed in)."""
        with self._lock:
            if self._model is None:
                self._model = self._load_model()
            return self._model

    def _load_model(self) -> Any:
        from polysense import load

        ckpt = self.meta["checkpoint"]
        try:
            model = load(ckpt, family="clip")
        except PolysenseError as exc:
            raise PolysenseError(
                f"{self.directory / META} names checkpoint {ckpt}, which cannot be loaded ({exc}); "
                "pass the model with EmbeddingIndex.open(dir, model=...) or rebuild the index"
            ) from None
        if _fingerprint(ckpt) != self.meta.get("checkpoint_sha256"):
            raise PolysenseError(
                f"{ckpt}: the weights changed since the index {self.directory} was built "
                "(sha256 differs), so new queries would not match the stored embeddings; "
                "rebuild the index with `polysense index build`"
            )
        return model

    # -------------------------------------------------------------- add

    def add(
        self,
        data: str | Path,
        *,
        split: str | None = None,
        batch_size: int = 256,
        progress: bool = True,
        limit: int | None = None,
        image_root: str | Path | None = None,
        device: str = "cpu",
        num_workers: int | None = None,
        compile: bool = False,
    ) -> int:
        """Append the samples of `data` (old rows are neither re-embedded nor re-indexed: faiss
        `add` on a copy), swap the result in, and return the number of items added. Keys already
        in the index are rejected to `rejects.jsonl`. An approximate index is re-tuned. Images
        are decoded in `num_workers` DataLoader workers while the model embeds on `device`
        (`compile`: its image tower through torch.compile)."""
        _check_common(batch_size, limit)
        options = EmbedOptions(
            device=device, batch_size=batch_size, num_workers=num_workers, compile=compile
        )
        check_options(options)
        faiss = ann.faiss_module()
        model = self.model
        out = self.directory
        with _temp_sibling(out) as tmp:
            for name in (_emb_file("image"), _emb_file("text"), ITEMS_DB):
                shutil.copyfile(out / name, tmp / name)
            source = _ingest(
                tmp,
                model,
                data,
                dim=self.dim,
                split=split,
                options=options,
                progress=progress,
                limit=limit,
                image_root=image_root,
            )
            source.pop("dim")
            counts = {
                "items": len(self) + source["items"],
                "texts": self.n_texts + source["texts"],
            }
            sizes = {"image": counts["items"], "text": counts["texts"]}
            vectors = {m: _load_emb(tmp / _emb_file(m), n, self.dim) for m, n in sizes.items()}
            params = {}
            for modality, old_n in (("image", len(self)), ("text", self.n_texts)):
                index = faiss.read_index(str(out / _faiss_file(modality)))  # the live one: a copy
                params[modality] = ann.extend(
                    index,
                    self.meta["index"][modality],
                    vectors[modality],
                    old_n,
                    cross_queries=_others(vectors, modality),
                )
                faiss.write_index(index, str(tmp / _faiss_file(modality)))
            del vectors
            meta = {
                **self.meta,
                "counts": counts,
                "index": params,
                "sources": [*self.meta["sources"], source],
                "updated": _now(),
            }
            _write_meta(tmp, meta)
            _swap_in(tmp, out)
        self._db.close()  # the old files stay readable until here (open handles)
        self._load(out, _read_meta(out))
        return int(source["items"])

    # -------------------------------------------------------------- search

    def search(
        self,
        query_emb: np.ndarray,
        *,
        k: int,
        modality: str = "image",
        dedup: float | None = None,
    ) -> list[list[Hit]]:
        """Top-k `modality` items by inner product for each row of `query_emb` (Q, D), best
        first. Fewer than k when the index holds fewer. With `dedup` (a cosine in (0, 1]), a
        candidate whose similarity to an already kept result is >= dedup is dropped."""
        k, modality, dedup = _check_search(k, modality, dedup)
        queries = _check_queries(query_emb, self.dim)  # (Q, D)
        n = len(self._emb[modality])
        if n == 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        index, params = self._faiss[modality], self.meta["index"][modality]
        fetch = min(k, n) if dedup is None else min(n, DEDUP_FETCH * k, DEDUP_MAX_CANDIDATES)
        scores, ids = ann.search(index, params, queries, fetch)  # (Q, fetch)
        out = []
        for i in range(len(queries)):
            rows, row_scores = ids[i], scores[i]
            if dedup is not None:
                rows, row_scores = self._dedup(modality, queries[i], rows, row_scores, k, dedup)
            valid = rows >= 0
            out.append(self._hits(modality, rows[valid][:k], row_scores[valid][:k]))
        return out

    def _dedup(
        self,
        modality: str,
        query: np.ndarray,
        rows: np.ndarray,
        scores: np.ndarray,
        k: int,
        threshold: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy near-duplicate suppression over the candidates, fetching more while short."""
        emb = self._emb[modality]
        limit = min(len(emb), DEDUP_MAX_CANDIDATES)
        while True:
            fetched, valid = len(rows), rows >= 0
            rows, scores = rows[valid], scores[valid]
            keep = _greedy_keep(np.asarray(emb[rows]), threshold, k)
            if len(keep) >= k or fetched >= limit:
                return rows[keep], scores[keep]
            fetch = min(limit, fetched * DEDUP_FETCH)
            index, params = self._faiss[modality], self.meta["index"][modality]
            found = ann.search(index, params, query[None], fetch)
            scores, rows = found[0][0], found[1][0]

    def _hits(self, modality: str, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        if len(rows) == 0:
            return []
        marks = ",".join("?" * len(rows))
        path = "json_extract(i.extra, '$.image_path')"
        if modality == "image":
            sql = f"SELECT i.row, i.key, i.captions, {path} FROM items i WHERE i.row IN ({marks})"
        else:
            sql = (
                f"SELECT t.row, i.key, t.caption, {path} FROM texts t "
                f"JOIN items i ON i.row = t.item_row WHERE t.row IN ({marks})"
            )
        with self._lock:
            found = {r: rest for r, *rest in self._db.execute(sql, rows.tolist())}
        hits = []
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
            key, caption, image_path = found[row]
            if modality == "image":
                captions = json.loads(caption)
                caption = captions[0] if captions else None
            hits.append(
                Hit(
                    key=key,
                    score=float(score),
                    caption=caption,
                    modality=modality,
                    row=row,
                    image_path=image_path if isinstance(image_path, str) else None,
                )
            )
        return hits

    def search_text(
        self,
        texts: Sequence[str] | str,
        *,
        k: int,
        modality: str = "image",
        dedup: float | None = None,
        batch_size: int = 256,
    ) -> list[list[Hit]]:
        """Embed `texts` and search: text -> image by default, text -> text with modality="text"."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
        if bad:
            raise PolysenseError(f"search text must be non-empty strings, got {bad[0]!r}")
        _check_search(k, modality, dedup)  # before paying for the embedding
        if not texts:
            return []
        queries = _embed_texts(self.model, texts, batch_size)  # (Q, D)
        return self.search(queries, k=k, modality=modality, dedup=dedup)

    def search_image(
        self,
        images: Sequence[Image.Image],
        *,
        k: int,
        modality: str = "image",
        dedup: float | None = None,
        batch_size: int = 256,
    ) -> list[list[Hit]]:
        """Embed PIL `images` and search: image -> image, or image -> text with modality="text"."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        bad = [im for im in images if not isinstance(im, Image.Image)]
        if bad:
            raise PolysenseError(f"search_image takes PIL images, got {type(bad[0]).__name__}")
        _check_search(k, modality, dedup)  # before paying for the embedding
        if not images:
            return []
        queries = _embed_images(self.model, images, batch_size)  # (Q, D)
        return self.search(queries, k=k, modality=modality, dedup=dedup)

    # -------------------------------------------------------------- items

    def item(self, key: str) -> dict[str, Any] | None:
        """An item's metadata: key, row, captions, source, split and pass-through fields
        (objects, label ...); None for an unknown key."""
        sql = "SELECT row, key, captions, source, split, extra FROM items WHERE key = ?"
        with self._lock:
            found = self._db.execute(sql, (str(key),)).fetchone()
        if found is None:
            return None
        row, key, captions, source, split, extra = found
        base = {"key": key, "row": row, "captions": json.loads(captions)}
        return {**json.loads(extra), **base, "source": source, "split": split}

    def image_bytes(self, key: str) -> bytes | None:
        """The item's image as PNG bytes (None for an unknown key)."""
        with self._lock:
            found = self._db.execute(
                "SELECT image FROM items WHERE key = ?", (str(key),)
            ).fetchone()
        return None if found is None or found[0] is None else bytes(found[0])

    def __repr__(self) -> str:
        kinds = {m: p["type"] for m, p in self.meta["index"].items()}
        return (
            f"EmbeddingIndex({self.directory}, items={len(self)}, texts={self.n_texts}, "
            f"dim={self.dim}, index={kinds})"
        )


def _greedy_keep(vectors: np.ndarray, threshold: float, k: int) -> list[int]:
    """Indices of candidates (C, D), best first, each below `threshold` cosine to those kept."""
    kept = np.empty((k, vectors.shape[1]), np.float32)  # (k, D)
    keep: list[int] = []
    for i, v in enumerate(vectors):
        if keep and float((kept[: len(keep)] @ v).max()) >= threshold:
            continue
        kept[len(keep)] = v
        keep.append(i)
        if len(keep) == k:
            break
    return keep


def _check_search(k: Any, modality: str, dedup: Any) -> tuple[int, str, float | None]:
    """The validated (k, modality, dedup) of a search call."""
    modality = _check_modality(modality)  # checked first, as before
    return _check_k(k), modality, _check_dedup(dedup)


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise PolysenseError(f"modality={modality!r}: must be 'image' or 'text'")
    return modality


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise PolysenseError(f"k={k!r}: must be an integer from 1 to {MAX_K}; use --k")
    return int(k)


def _check_dedup(dedup: Any) -> float | None:
    if dedup is None:
        return None
    if isinstance(dedup, bool) or not isinstance(dedup, int | float) or not 0 < dedup <= 1:
        raise PolysenseError(
            f"dedup={dedup!r}: must be a cosine similarity in (0, 1], e.g. 0.95; use --dedup"
        )
    if not math.isfinite(dedup):
        raise PolysenseError(f"dedup={dedup!r}: must be finite")
    return float(dedup)


def _check_queries(query_emb: Any, dim: int) -> np.ndarray:
    q = np.asarray(query_emb, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim:
        raise PolysenseError(
            f"query embeddings have shape {np.shape(query_emb)}; the index wants (Q, {dim})"
        )
    if not np.isfinite(q).all():
        raise PolysenseError("query embeddings contain NaN or inf")
    return np.ascontiguousarray(q)  # (Q, D)
