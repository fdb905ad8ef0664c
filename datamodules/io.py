"""Writing files a crash cannot leave half-written: used by the data's prediction writers and by checkpoints."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFullError


def atomic_write(path: str | Path, write: Callable[[str], None], *, size_hint: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` and rename it into place, so a crash
    never leaves a half-written output under the real name. A write that runs out of space (ENOSPC, EDQUOT,
    also when a library wraps it, as torch.save does) raises a ``DiskFullError`` naming the folder, the bytes
    needed (``size_hint``, else more than were written) and the bytes free; the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file private; give it the permissions of a plain open
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        Path(tmp).unlink(missing_ok=True)
        if disk_full(err) is None:
            raise
        free = shutil.disk_usage(path.parent).free
        needed = f"about {size_text(size_hint)}" if size_hint else f"more than {size_text(written)}"
        raise DiskFullError(
            f"{path.parent}: no space left on the device to write {path.name}: it needs {needed}, {size_text(free)} "
            f"free (the previous {path.name}, if any, is intact)"
        ) from err
    return path


def disk_full(err: BaseException) -> OSError | None:
    """The out-of-space ``OSError`` behind ``err`` (itself, or its cause or context), ``None`` when there is none."""
    for _ in range(8):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            return None
        err = nxt
    return None


def size_text(size: int) -> str:
    """``size`` bytes as a person reads it, with the exact count: ``1.5 GiB (1610612736 bytes)``."""
    value, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({size} bytes)"
