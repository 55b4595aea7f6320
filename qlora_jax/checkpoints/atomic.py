"""Writing a directory all at once: into a temporary sibling, then renamed into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yields a temporary directory that replaces ``out_dir`` when the block succeeds.

    On an exception the temporary directory is removed and ``out_dir`` is left
    as it was (absent, or with its previous contents).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if os.path.exists(out_dir):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(out_dir, backup)
    os.rename(tmp, out_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
