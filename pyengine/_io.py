"""Atomic file writes shared by the run state (pyengine.train.checkpoint) and the export
(pyengine.graph.export): a kill never leaves a half-written file, and a full disk is reported by
name. Imports only the standard library and torch (the bottom layer)."""
from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_torch_save", "atomic_write_text", "atomic_write_bytes", "error_line", "read_safetensors"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once: os.umask can only be read by setting it


def atomic_write_bytes(data: bytes | str, path: Path) -> None:
    """Writes through a temporary file in the same folder and renames it over ``path``, so a kill
    never leaves a half-written file; a full disk raises OSError(ENOSPC) naming the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes it owner-only; the file gets what open() would give
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} "
                          f"({len(data) / 2**20:.1f} MiB); free some space and resume the run") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save into memory, then an atomic write (so disk errors come back as OSError with their
    real cause, not as torch's 'basic_ios::clear: iostream error')."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), Path(path))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(text, Path(path))


def error_line(exc: BaseException) -> str:
    """``Type: first line of the message`` for a one-line error about a file, without advice that
    does not apply to a file pyengine refuses to trust (torch.load's "weights_only=False" hint)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "re-running `torch.load`" not in ln]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a truncated or foreign file raises ValueError naming it
    (``what``: how the user gave it, e.g. "--weights")."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{what} {path}: not a readable safetensors file, truncated or foreign "
                         f"({error_line(exc)})") from None
