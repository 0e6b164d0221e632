"""Names and files that come from folders the user did not write: checked before they become paths or outputs.

A pipeline folder downloaded from the Hub, cloned with git or unpacked from an archive is
someone else's data. Its ``model_index.json`` keys become folder names, its files are copied
into outputs and uploaded. So:

- a name used as a path (a component of ``model_index.json``) must be a plain name: no ``/`` or
  ``\\``, not ``.`` or ``..``, not empty (:func:`plain_name`);
- a symbolic link is followed only when it points inside the folder it was found in, or, for a
  snapshot of the Hub's cache (``models--ORG--NAME/snapshots/REV``), inside that repository's cache
  folder, where the snapshot's links to ``blobs/`` point (:func:`link_root`). Any other link is
  refused, naming the link and where it points (:func:`input_files`): a link to
  ``~/.cache/huggingface/token`` or ``/etc/passwd`` never reaches an export or an upload.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from diffusers_hprune.utils.checks import InputError

_SEPARATORS = ("/", "\\", "\0")


def plain_name(name, what: str, *, error: type[Exception] = InputError) -> str:
    """``name`` if it is a plain file name (usable as one folder below another), else ``error`` naming ``what``."""
    if (not isinstance(name, str) or name in ("", ".", "..") or any(s in name for s in _SEPARATORS)
            or name != name.strip()):
        raise error(f"{what} {name!r} is not a plain name (it must be one folder or file name: no '/', '\\', '..' or "
                    "surrounding spaces); it would be used as a path, so it is refused. Use a folder that "
                    "save_pretrained wrote, or correct the name.")
    return name


def check_index_names(index: dict, source: str | os.PathLike, *, error: type[Exception] = InputError) -> dict:
    """Every key of a ``model_index.json`` (``index``, read from ``source``) is a plain name; returns ``index``."""
    for key in index:
        plain_name(key, f"{Path(source) / 'model_index.json'} names a component", error=error)
    return index


def check_model_index(index, source: str | os.PathLike, *, error: type[Exception] = InputError) -> dict:
    """``index`` (a parsed ``model_index.json`` of the folder ``source``) when it is shaped as Diffusers writes it: an
    object with a string ``_class_name``, each component a plain name mapped to ``[library, class]`` (two strings,
    or two nulls for an absent optional component) whose folder exists. ``error`` naming the first fault otherwise,
    before Diffusers reads it (it raises tracebacks on such files) or a command copies from it."""
    where = Path(source) / "model_index.json"
    if not isinstance(index, dict):
        raise error(f"{where} is not a pipeline index (a JSON object); use a folder that save_pretrained wrote.")
    if not isinstance(index.get("_class_name"), str):
        raise error(f"{where} has no pipeline class (_class_name); use a folder that save_pretrained wrote.")
    check_index_names(index, source, error=error)
    for name, entry in index.items():
        if name.startswith("_") or name == "auto_map":  # metadata (a remote-code export's AutoModel entry)
            continue
        if (not isinstance(entry, list) or len(entry) != 2
                or not (all(isinstance(e, str) for e in entry) or entry == [None, None])):
            raise error(f"{where}: the component {name!r} must be [library, class] (two strings, or two nulls for a "
                        f"component left out), got {entry!r}; use a folder that save_pretrained wrote.")
        if entry[0] is not None and not (Path(source) / name).is_dir():
            raise error(f"{where} names the component {name!r}, but {Path(source) / name} is not there: the folder is "
                        "incomplete. Download or save it again.")
    return index


def link_root(folder: str | os.PathLike) -> Path:
    """The folder that symbolic links below ``folder`` may point into (resolved).

    ``folder`` itself; for a snapshot of the Hub's cache (``.../models--ORG--NAME/snapshots/REV``)
    the repository's cache folder, whose ``blobs/`` hold the files the snapshot links to.
    """
    folder = Path(folder).absolute()
    for candidate in (folder, *folder.parents):
        if candidate.parent.name == "snapshots" and candidate.parent.parent.name.startswith(("models--", "datasets--")):
            return candidate.parent.parent.resolve()
    return folder.resolve()


def _check_link(path: Path, root: Path, error: type[Exception]) -> None:
    target = path.resolve()
    if target != root and root not in target.parents:
        raise error(f"{path} is a symbolic link to {os.readlink(path)} ({target}), outside the folder it is in "
                    f"({root}): refused, links are never followed out of an input into an output or an upload. "
                    "Copy the file itself into the folder (e.g. `cp -L`) if you mean it to be part of the model.")


def input_files(folder: str | os.PathLike, *, root: str | os.PathLike | None = None,
                error: type[Exception] = InputError) -> Iterator[Path]:
    """The files below ``folder`` (sorted within each folder, paths below ``folder`` as given).

    A symbolic link (to a file or a folder) is followed when it points inside ``root`` (default:
    :func:`link_root` of ``folder``; a pipeline's component folder passes the pipeline's), and
    refused with ``error`` otherwise; a folder reached twice through links is walked once.
    """
    folder = Path(folder)
    root = link_root(root if root is not None else folder)
    seen: set[Path] = set()

    def walk(directory: Path) -> Iterator[Path]:
        real = directory.resolve()
        if real in seen:
            return
        seen.add(real)
        for path in sorted(directory.iterdir()):
            if path.is_symlink():
                _check_link(path, root, error)
            if path.is_dir():
                yield from walk(path)
            elif path.is_file():
                yield path

    yield from walk(folder)


def check_input_links(folder: str | os.PathLike, *, error: type[Exception] = InputError) -> Path:
    """Refuse ``folder`` when a symbolic link below it points outside :func:`link_root` (before any work)."""
    for _ in input_files(folder, error=error):
        pass
    return Path(folder)


__all__ = ["check_index_names", "check_model_index", "check_input_links", "input_files", "link_root", "plain_name"]
