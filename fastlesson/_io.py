"""Atomic file writes: a crash or Ctrl-C never leaves a half-written file at the final path."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path, write: Callable[[Path], object], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then ``os.replace`` it onto ``path``.

    The temporary file is removed on any failure; the file gets the usual umask permissions
    (``mkstemp`` alone makes 0600 files). ``fsync=True`` flushes it to disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old or the new file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8", newline=""))


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path, obj, indent: int = 2) -> Path:
    """Write `obj` as indented JSON (a trailing newline; non-JSON values such as paths as ``str``), atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def save_png(fig, path, **kw) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100, **kw))
