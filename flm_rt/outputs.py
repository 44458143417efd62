"""How flm_rt writes outputs (convert, save, export): one rule for every writer.

* An existing destination is refused unless ``overwrite=True`` (CLI ``--overwrite``); even then only something
  flm_rt wrote (an flm_rt model folder, an exported file) is replaced, never an arbitrary folder.
* Outputs are built in a temporary sibling named ``.<prefix><pid>-...`` and renamed into place, so a reader never
  sees half a model. A writer that was killed leaves its temporary behind; the next writer in that folder removes
  the temporaries whose process no longer exists.
* Permissions follow the umask, as for any file the user creates (a temporary folder is created 0700).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Callable, Optional


def current_umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way (briefly sets it)
    os.umask(mask)
    return mask


def apply_umask(root: str) -> None:
    """Give a finished temporary folder and the files in it the modes a plain mkdir / open would have."""
    mask = current_umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def sweep_stale(parent: str, prefix: str) -> list[str]:
    """Remove ``<parent>/<prefix><pid>-*`` temporaries whose writer process is gone. Returns what was removed."""
    removed = []
    pattern = re.compile(re.escape(prefix) + r"(\d{1,10})-")
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if m and not _alive(int(m.group(1))):
            path = os.path.join(parent, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def make_temp_dir(parent: str, prefix: str) -> str:
    sweep_stale(parent, prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)


def check_destination(dst: str, *, overwrite: bool, replaceable: Callable[[str], bool], error: type,
                      hint: str) -> None:
    """Refuse an existing ``dst`` (a dangling link counts) unless overwrite and ``replaceable(dst)``."""
    if not os.path.lexists(dst):
        return
    if os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst):
        return  # an empty folder is as good as none
    if not overwrite:
        raise error(f"{dst}: already exists; choose a new path, remove it, or {hint}")
    if not replaceable(dst):
        raise error(f"{dst}: exists and was not written by flm_rt; flm_rt does not replace it even with overwrite")


def move_into_place(tmp: str, dst: str, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst``, replacing an empty folder, or with overwrite (after check_destination) an old
    output. Without overwrite, a ``dst`` that another writer filled meanwhile makes this raise OSError."""
    old: Optional[str] = None
    if os.path.isdir(dst) and not os.path.islink(dst):
        if overwrite and os.listdir(dst):
            old = tempfile.mkdtemp(prefix=os.path.basename(tmp) + "-old-", dir=os.path.dirname(tmp))
            os.replace(dst, os.path.join(old, "x"))
        elif not os.listdir(dst):
            os.rmdir(dst)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
