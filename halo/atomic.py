"""Atomic file replacement: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0)  # os has no getter: read the process umask once, to give new files the usual mode
os.umask(_UMASK)


def atomic_replace(path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then move it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Replace `path` with `data` atomically."""
    return atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))
