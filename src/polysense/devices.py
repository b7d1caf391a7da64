"""Device names from the command line and configs, checked against the machine."""

from __future__ import annotations

import torch

from polysense.errors import PolysenseError


def resolve_device(device: str, *, flag: str = "--device") -> torch.device:
    """ "auto" -> cuda if available, else cpu; "cpu", "cuda", "cuda:N" (and "mps" where torch has
    it) as given, checked. A bad name, or a device this machine lacks, is a one-line error naming
    `flag`."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise PolysenseError(
            f"{flag} {name!r}: not a device; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    if dev.type not in ("cpu", "cuda"):
        raise PolysenseError(f"{flag} {name!r}: use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise PolysenseError(
                f"{flag} {name!r}: this machine has {count} CUDA device(s); use {flag} cpu"
            )
    return dev
