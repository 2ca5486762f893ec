"""Weight-layout timings the engine measured on this processor, remembered between processes.

Which layout multiplies one row fastest depends on the processor (engine.bf16_layout_for_decoding): timing it took
~1 s of a ~2 s load of the medium benchmark model, paid again by every process. The timings depend only on the
processor, PyTorch, this package's timed code, the number of threads, the rows' dtype and the layers' shapes, so
they are measured by the first loads that meet a combination of these and kept in a small JSON file,
`$LLAVA_NEXT_CACHE_DIR/layouts.json`, by default under `$XDG_CACHE_HOME/llava-next` (~/.cache/llava-next). The
engine decides from the remembered timings with its current thresholds. A file that cannot be read or written (or a
home that cannot be found) only means measuring again.

A timing is trusted once two loads have measured it (MEASUREMENTS_TO_TRUST): each measurement keeps, for each
layout, the faster of its own time and the remembered one (a busy machine only ever adds time), so one measurement
taken while something else ran does not decide for good. Processes that start together (a server's workers) measure
one after another, under a lock next to the file, so that none times its layers while another's timing competes for
the memory, and the later ones find the timing remembered. Each write of the file (read, change, replace) takes a
short lock of its own, so that no process's entry is lost to another's write.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import torch

# Raised when the code the timings run changes (quantize.time_bf16_layouts, time_int8_layouts, time_float32_kernels
# and what they call):
# timings taken by other code are not this code's. 2: time_int8_layouts compiles the blocks for fixed sizes.
TIMED_CODE_VERSION = 2

# Remembered timings are taken without timing again once this many loads have measured them.
MEASUREMENTS_TO_TRUST = 2

# How long a process waits for another one's measurement (~1 s on medium, ~7 s for a 7B model's compiled int8 layers)
# before measuring anyway.
LOCK_WAIT_SECONDS = 120.0
# ... and for another's write of the file (milliseconds) before writing anyway.
WRITE_WAIT_SECONDS = 10.0


def cache_dir() -> Path | None:
    if os.environ.get("LLAVA_NEXT_CACHE_DIR"):
        return Path(os.environ["LLAVA_NEXT_CACHE_DIR"])
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llava-next"
    except RuntimeError:  # no HOME and no passwd entry (a container under an arbitrary user id): nothing kept
        return None


def cache_file() -> Path | None:
    directory = cache_dir()
    return directory / "layouts.json" if directory is not None else None


def processor() -> str:
    """The CPU's model name and a digest of its features (the first processor of /proc/cpuinfo on Linux: a virtual
    machine may show a generic name, or hide AMX under a real one), with PyTorch's view of its vector instructions."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip() and fields:
                break
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    features = ";".join(fields.get(field, "") for field in ("flags", "Features", "CPU implementer", "CPU part"))
    return (f"{name} ({torch.backends.cpu.get_cpu_capability()}, features "
            f"{hashlib.sha256(features.encode()).hexdigest()[:12]})")


def key(what: str, shapes: list[tuple[int, int]]) -> str:
    """The conditions a timing of `what` over layers of these (out, in) shapes holds for."""
    from . import __version__

    layers = hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
    return (f"{what} | {processor()} | torch {torch.__version__} | llava_next {__version__}/{TIMED_CODE_VERSION} | "
            f"{torch.get_num_threads()} threads | layers {layers}")


def _entries() -> dict:
    path = cache_file()
    if path is None:
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def is_seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def recall(key: str, layouts: tuple[str, ...]) -> dict | None:
    """The remembered {"seconds": {layout: seconds for each of `layouts`}, "date", "measurements"} for `key`, or
    None (none, or one that is not whole)."""
    entry = _entries().get(key)
    if not (isinstance(entry, dict) and isinstance(entry.get("date"), str) and isinstance(entry.get("seconds"), dict)
            and set(entry["seconds"]) == set(layouts) and all(map(is_seconds, entry["seconds"].values()))):
        return None
    measurements = entry.get("measurements", 1)  # (files written before the count was kept: one)
    if not (isinstance(measurements, int) and not isinstance(measurements, bool) and measurements >= 1):
        return None
    return {**entry, "measurements": measurements}


# How deep in `measuring()` each thread is: an inner one (a load inside a load) holds the lock already.
_held = threading.local()


def _open_lock(name: str):
    """The lock file `name` in the cache directory, or None (no directory, no locks here, not writable or readable)."""
    directory = cache_dir()
    if importlib.util.find_spec("fcntl") is None or directory is None:  # (Windows has no fcntl)
        return None
    for mode in ("a", "r"):  # (read-only suffices to lock: a lock file another user made, a read-only cache)
        try:
            if mode == "a":
                directory.mkdir(parents=True, exist_ok=True)
            return open(directory / name, mode)
        except OSError:
            continue
    return None


def _take(lock, wait_seconds: float) -> str:
    """flock the open lock file `lock`: "locked", "no lock" (a file system without locks) or "not waited"."""
    import fcntl

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "locked"
        except BlockingIOError:
            if time.monotonic() > deadline:
                return "not waited"
            time.sleep(0.05)
        except OSError:
            return "no lock"


@contextlib.contextmanager
def measuring():
    """Held while a process recalls, measures and remembers timings: one process at a time measures. Yields
    "locked", "no lock" (no cache directory, a file system without locks, Windows: measured without one) or
    "not waited" (another process held the lock longer than LOCK_WAIT_SECONDS). A process that dies holding it
    releases it. Within one thread it nests: an inner `measuring()` is given the lock the outer one holds."""
    depth = getattr(_held, "depth", 0)
    if depth:
        _held.depth = depth + 1
        try:
            yield _held.state
        finally:
            _held.depth = depth
        return
    lock = _open_lock("layouts.lock")
    state = _take(lock, LOCK_WAIT_SECONDS) if lock is not None else "no lock"
    _held.depth, _held.state = 1, state
    try:
        yield state
    finally:
        _held.depth = 0
        if lock is not None:
            # (closing the file releases the lock; a child forked without exec while measuring would keep it until it
            # ends, but files are opened close-on-exec, so a child that runs a new program does not)
            lock.close()


def remember(key: str, seconds: dict[str, float], measurements: int = 1) -> None:
    path = cache_file()
    if path is None:
        return
    # Read, change and replace under a lock of its own, held only for that: a process that measured without the
    # measuring lock (it waited too long, or found none) still loses no other process's entry.
    lock = _open_lock("layouts.write.lock")
    try:
        if lock is not None:
            _take(lock, WRITE_WAIT_SECONDS)
        _write(path, key, {"seconds": seconds, "date": datetime.date.today().isoformat(),
                           "measurements": measurements})
    finally:
        if lock is not None:
            lock.close()


def _write(path: Path, key: str, entry: dict) -> None:
    entries = _entries()
    entries[key] = entry
    written = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole and renamed into place: a process reading it meanwhile sees the old file or the new one
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            written = f.name
            json.dump(entries, f, indent=1, sort_keys=True)
        os.chmod(written, 0o644)  # (as a file written by open() would be: readable by those who share the directory)
        os.replace(written, path)
        written = None
    except OSError:
        pass  # (a read-only home: the next process measures again)
    finally:
        if written is not None:
            with contextlib.suppress(OSError):
                os.unlink(written)
