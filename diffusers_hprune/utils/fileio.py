"""Atomic file output: readers never see a half-written file, and what a stopped command wrote goes.

Every output is written under a hidden scratch name beside it, ``.<name>.<host>-<pid>.<random>.tmp``
(``.<name>.<host>-<pid>.old`` for the output an ``--overwrite`` replaces), and renamed into place
when complete. An error, Ctrl-C or SIGTERM (:mod:`diffusers_hprune.utils.interrupts`) removes the
scratch; what a killed process (SIGKILL, power loss) left is removed by the next write of the same
output on the same host, once no process of that id runs (:func:`remove_stale_scratch`). Nothing
else beside an output is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffusers_hprune.utils.interrupts import uninterrupted
from diffusers_hprune.utils.untrusted import input_files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_user_mode(path: str | os.PathLike) -> Path:
    """Give ``path`` the mode a plain ``open`` / ``mkdir`` would have: 0666 / 0777 less the umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` make 0600 files and 0700 folders whatever the umask, so
    what is renamed into place from them would be readable by its owner only.
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def safetensors_user_modes(folder: str | os.PathLike) -> None:
    """Give the ``*.safetensors`` files under ``folder`` that safetensors wrote 0600 the mode ``open`` would give.

    safetensors 0.8 writes through a temporary file and a rename, so every weight file it
    writes is 0600 whatever the umask (safetensors issue #782): another user, or a container
    running under another uid, could not read the model. Files of any other mode are left as they are.
    """
    folder = Path(folder)
    for path in [folder] if folder.is_file() else sorted(folder.rglob("*.safetensors")):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            with_user_mode(path)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def _scratch_prefix(path: Path) -> str:
    """The start of the scratch names of ``path`` written by this process: ``.<name>.<host>-<pid>.``."""
    return f".{path.name}.{_host()}-{os.getpid()}."


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_scratch(path: str | os.PathLike) -> list[Path]:
    """Remove the scratch files and folders of ``path`` (see the module's text) that a process of this host left
    and that no longer runs; returns them. Names of any other form are never touched."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(_host())}-(\d+)\.(?:[A-Za-z0-9_]+\.tmp(?:\.[A-Za-z0-9]+)?|old)")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _running(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename (mode as ``open`` gives)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(path)
    fd, tmp = tempfile.mkstemp(prefix=_scratch_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with_user_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON (with a final newline) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` (mode as ``mkdir`` gives); on success it is renamed to ``path``.

    On error the temporary folder is deleted and ``path`` is left as it was. With
    ``overwrite=False`` an existing ``path`` is an error (raised before any work).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another output folder or pass overwrite=True (--overwrite).")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(path)
    tmp = with_user_mode(tempfile.mkdtemp(prefix=_scratch_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        with uninterrupted():  # the old output or the new one in place, never neither
            if path.exists() or path.is_symlink():
                old = path.with_name(f"{_scratch_prefix(path)}old")
                os.replace(path, old)
            os.replace(tmp, path)
    finally:  # also when a signal held during the swap is raised as it ends
        if os.path.lexists(tmp):  # the swap did not happen
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(old):
            if not os.path.lexists(path):
                os.replace(old, path)  # the new output did not arrive: the old one goes back
            elif old.is_dir() and not old.is_symlink():  # what --overwrite replaced: a folder, or a file, or a link
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (e.g. ``savefig``); renamed to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(path)
    fd, tmp = tempfile.mkstemp(prefix=_scratch_prefix(path), suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    with_user_mode(tmp)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def copy_files(source: str | os.PathLike, target: str | os.PathLike, *, root: str | os.PathLike | None = None) -> None:
    """Copy the files below ``source`` into ``target``, made with the user's umask.

    Symbolic links are followed only inside ``root`` (default ``source``; for a Hub cache
    snapshot, its repository's cache folder); a link out of it is an ``InputError`` raised before
    anything is copied (:func:`~diffusers_hprune.utils.untrusted.input_files`). Not ``shutil.copytree``: that
    copies the source's permission bits, so a read-only source (an installed package, a cache)
    would give read-only output.
    """
    source, target = Path(source), Path(target)
    for path in list(input_files(source, root=root)):  # every link checked before the first copy
        (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.relative_to(source))
