"""Weight layouts the engine measured on this machine, remembered between processes.

Which layout multiplies one row fastest depends on the processor (engine.bf16_layout_for_decoding): timing it took
~1.3 s of a 2.3 s load of the medium benchmark model, paid again by every process. The choice depends only on the
processor, PyTorch, the number of threads and the layers' shapes, so it is measured once per combination of these
and kept in a small JSON file: `$LLAVA_NEXT_CACHE_DIR/layouts.json`, by default under `$XDG_CACHE_HOME/llava-next`
(~/.cache/llava-next). A file that cannot be read or written only means measuring again.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch


def cache_dir() -> Path:
    if os.environ.get("LLAVA_NEXT_CACHE_DIR"):
        return Path(os.environ["LLAVA_NEXT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-next"


def cache_file() -> Path:
    return cache_dir() / "layouts.json"


def processor() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def key(what: str, shapes: list[tuple[int, int]]) -> str:
    """The conditions a measurement of `what` over layers of these (out, in) shapes holds for."""
    layers = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return f"{what} | {processor()} | torch {torch.__version__} | {torch.get_num_threads()} threads | layers {layers}"


def _entries() -> dict:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def recall(key: str, layouts: tuple[str, ...]) -> dict | None:
    """The remembered {"layout", "seconds", "date"} for `key`, or None (none, or not one of `layouts`)."""
    entry = _entries().get(key)
    if not (isinstance(entry, dict) and entry.get("layout") in layouts and isinstance(entry.get("seconds"), dict)
            and all(isinstance(v, (int, float)) for v in entry["seconds"].values())):
        return None
    return entry


def remember(key: str, layout: str, seconds: dict[str, float]) -> None:
    entries = _entries()
    entries[key] = {"layout": layout, "seconds": seconds, "date": datetime.date.today().isoformat()}
    written = None
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        # written whole and renamed into place: a process reading it meanwhile sees the old file or the new one
        with tempfile.NamedTemporaryFile("w", dir=cache_dir(), suffix=".tmp", delete=False) as f:
            written = f.name
            json.dump(entries, f, indent=1, sort_keys=True)
        os.replace(written, cache_file())
    except OSError:  # (a read-only home: the next process measures again)
        if written is not None:
            with contextlib.suppress(OSError):
                os.unlink(written)
