"""Writing what a user named without ever destroying what is there: write beside it, rename on success.

Every command that writes a file or a directory the user names (`ds-data`, `ds-export`, `ds-eval`, the
run directory's `config.yaml`) goes through these two context managers: the new content is written
under a temporary name in the same directory and replaces the target only when it is complete, so a
failed command (a refusal, a full disk, a signal) leaves an existing target as it was and no partial
file behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ds_train.errors import UsageError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _new_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file (0o666 less the umask)."""
    return 0o666 & ~_umask()


@contextmanager
def replacing_file(path: str | os.PathLike, *, fsync: bool = False, binary: bool = False) -> Iterator[IO]:
    """An open file beside `path` (text, utf-8, unless `binary`); when the block ends without an error
    it replaces `path` (an existing file keeps its permission bits), otherwise it is removed and `path`
    is left as it was. `fsync`: the data reaches the disk before the rename."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else _new_file_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """`text` into `path`, replacing it only once the whole text is written."""
    with replacing_file(path, fsync=fsync) as f:
        f.write(text)


@contextmanager
def replacing_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh empty directory beside `target`; when the block ends without an error it takes
    `target`'s place (a previous `target` is removed only after that, and put back if the move
    fails), otherwise it is removed and `target` is left as it was."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # as `mkdir` would make it (mkdtemp's is 0o700)
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    try:
        yield staging
        if target.exists():
            target.rename(old)
        try:
            staging.rename(target)
        except OSError:
            if old.exists():
                old.rename(target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
