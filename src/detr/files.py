"""Writing and reading files safely: helpers every room that touches the disk shares.

- ``atomic_write(path, write)``: a file appears whole or not at all (checkpoints, exports, datasets);
- ``read_json(path, what)``: json whose errors name the file, line and column.

Imports nothing from the rest of the package, so any module may use it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _new_temp_file(path: Path) -> tuple[str, int]:
    """An empty file beside ``path`` and the mode a plain open() gives it (0666 less the umask)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        return str(tmp), mode


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], *, durable: bool = True) -> None:
    """Write through ``write(tmp_path)`` to a temporary file in the target directory, then rename it over
    ``path``: readers (other processes, other ranks) see the old file or the new one, never half of one.

    ``durable``: fsync the file and its directory first, so that a crash or power loss also leaves one
    of the two whole (checkpoints); without it, only other readers are protected (many small files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temp_file(path)
    try:
        write(tmp)
        # the file gets the mode of a plain open(), as torch.save's do; not tempfile.mkstemp's owner-only
        # 0600, which some writers (safetensors) also give the file they put in place of ours
        os.chmod(tmp, mode)
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_json(path: str | os.PathLike[str], what: str = "annotation file") -> Any:
    """Parse a json file; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in this {what}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, so not a json {what} ({e.reason} at byte {e.start})") from None
