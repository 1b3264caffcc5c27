"""Safe persistence: atomic writes, safetensors plus JSON, never pickle."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_replaceable(path: str | Path, marker: str) -> None:
    """Raise ValueError unless ``path`` is absent, an empty directory or holds ``marker`` (the file
    that the writer of such a directory always writes): the directory is replaced whole, and a
    user's directory given by mistake (``--out ~/work``) must not be."""
    path = Path(path)
    if path.exists() and not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path}: exists and holds no {marker}; only a directory this command wrote is replaced")


@contextmanager
def atomic_dir(path: str | Path, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` in one rename.

    A crash leaves either the old directory or the complete new one (plus a stray temp dir).
    With ``marker``, an existing ``path`` is replaced only if it is empty or holds that file
    (``check_replaceable``); otherwise ValueError, before anything is written.
    """
    if marker is not None:
        check_replaceable(path, marker)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the result private
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj) -> None:
    """Atomically write JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files private (0600)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle, say) is refused, never executed."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or int.from_bytes(head, "little") > os.path.getsize(path):
        raise ValueError(f"{path}: not a safetensors file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from None


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err})") from None
