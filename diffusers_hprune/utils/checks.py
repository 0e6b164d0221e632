"""Checks of what a user gives, where it enters: argparse types, text files, output paths, weight files.

Every failure is an :class:`InputError` (an ``HPruneError``, so the CLI prints it and exits 2)
or an ``argparse.ArgumentTypeError`` (argparse prints it with the flag and exits 2), naming
what was wrong and what to do.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from diffusers_hprune.utils.errors import HPruneError


class InputError(HPruneError):
    """A file, folder or value given by the user that cannot be used as it is."""


# -- argparse types -------------------------------------------------------------------------------
def _number(text: str, kind: type):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, counts)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (0 meaning "off", e.g. ``--checkpointing_steps 0``)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return _number(text, float)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, budgets in minutes)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (loss weights, weight decay, guidance scales)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A finite number in [0, 1]."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def boolean(text: str) -> bool:
    """``true`` / ``false`` (also yes/no, on/off, 1/0); any other spelling is an error, never ``False``."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; write true or false")


# -- values checked in code (configs built in Python, JSON files) ---------------------------------
def check_number(name: str, value, *, kind: type = float, minimum=None, maximum=None, exclusive_minimum: bool = False,
                 error: type[HPruneError] = InputError) -> None:
    """``value`` is a finite ``kind`` (``bool`` is never a number) within the bounds, else ``error`` naming ``name``."""
    ok_type = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise error(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}.")
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
        raise error(f"{name} must be {'above' if exclusive_minimum else 'at least'} {minimum:g}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be at most {maximum:g}, got {value!r}.")


def check_bool(name: str, value, *, error: type[HPruneError] = InputError) -> None:
    if not isinstance(value, bool):
        raise error(f"{name} must be true or false, got {value!r}.")


# -- files the user gives -------------------------------------------------------------------------
#: The largest text file a command reads (prompt files, plans, analyses, configs): 64 MiB. A real analysis of
#: FLUX.1 with pairs is under 1 MiB, 100,000 prompts under 20 MiB.
MAX_TEXT_BYTES = 64 * 2**20
#: The longest prompt: 10,000 characters (T5 reads at most 512 tokens of it; CLIP 77).
MAX_PROMPT_CHARS = 10_000


def read_text_file(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a UTF-8 file, or an InputError saying why it cannot be read (missing, a folder, not a regular
    file such as ``/dev/zero``, over ``max_bytes``, not UTF-8), checked before the file is read whole."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():
            raise InputError(f"The {what} {path} is not a regular file (a device, a pipe or a socket); give a text "
                             "file.")
        if path.is_file() and path.stat().st_size > max_bytes:
            raise InputError(f"The {what} {path} holds {path.stat().st_size:,} bytes, more than the {max_bytes:,} a "
                             "command reads; give a smaller file (split it, or keep the part you need).")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew while being read
            raise InputError(f"The {what} {path} holds more than the {max_bytes:,} bytes a command reads; give a "
                             "smaller file.")
        return data.decode("utf-8")
    except FileNotFoundError:
        raise InputError(f"The {what} {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InputError(f"The {what} {path} is a folder; give the file itself.") from None
    except UnicodeDecodeError as e:
        raise InputError(f"The {what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                         "(e.g. `iconv -t UTF-8`) and try again.") from None
    except OSError as e:
        raise InputError(f"Cannot read the {what} {path} ({e.strerror or e}); check the path and its permissions.") from None


def prompt_lines(text: str, source: str | os.PathLike = "the prompt file") -> list[str]:
    """The prompts of a prompt file's text: its non-empty lines, stripped. Lines end at ``\n`` (``\r\n`` too) only:
    a form feed, a vertical tab or U+2028 inside a prompt is part of it (``str.splitlines`` would split there). A
    line over :data:`MAX_PROMPT_CHARS` is an InputError naming it."""
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if len(line) > MAX_PROMPT_CHARS:
            raise InputError(f"Line {number} of {source} has {len(line):,} characters, more than the "
                             f"{MAX_PROMPT_CHARS:,} a prompt may have (the text encoders read 77 to 512 tokens); write "
                             "one prompt a line.")
        if line:
            prompts.append(line)
    return prompts


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(folder: Path, target: Path, flag: str) -> None:
    if not folder.is_dir():
        raise InputError(f"{flag} {target}: {folder} is a file, not a folder; choose a path inside a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {target}: the folder {folder} is not writable by this user; choose a folder you can "
                         "write to, or change its permissions.")


def check_output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` can be written as a file: not a folder, and its nearest existing folder is writable (checked before work)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'out.json'}).")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{flag} {path} exists and is not writable by this user; choose another path.")
    _check_writable_dir(_nearest_existing(path.parent), path, flag)
    return path


def check_output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` can be a folder that is written into: not a file, and writable (or creatable), checked before work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file; give a folder (a new one, or one this command wrote).")
    _check_writable_dir(_nearest_existing(path), path, flag)
    return path


def check_replaceable(path: str | os.PathLike, flag: str = "--out") -> None:
    """Before ``--overwrite`` replaces the folder ``path``: refuse one that holds files and is no pipeline folder (no
    ``model_index.json``), so a mistyped ``--out`` (a home folder, a project) never loses the user's files.

    An empty folder or a pipeline folder is replaced; a link is replaced as a link (the folder it names is kept).
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or (path / "model_index.json").is_file():
        return
    entries = sorted(entry.name for entry in path.iterdir())
    if entries:
        shown = ", ".join(repr(name) for name in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise InputError(f"{flag} {path} holds files that are not a pipeline folder ({shown}): --overwrite replaces "
                         "only a pipeline folder (one with model_index.json), and would delete them. Choose another "
                         f"{flag}, or move those files away first.")


def check_apart(output: str | os.PathLike, output_flag: str, *others: tuple[str | os.PathLike | None, str]) -> None:
    """Refuse an output that is, lies inside, or holds any of ``others`` (``(path, flag)``; ``None`` or a path that
    does not exist, e.g. a Hub id, is skipped), checked before any work.

    Writing into an input would change it, and ``--overwrite`` of a folder that holds an input would delete it.
    Links are resolved, so a link to the input is the input.
    """
    out = Path(output).resolve()
    for other, flag in others:
        if other is None or not Path(other).exists() and not Path(other).is_symlink():
            continue
        path = Path(other).resolve()
        if out == path:
            relation = "the same path as"
        elif path in out.parents:
            relation = "inside"
        elif out in path.parents:
            relation = "a folder that holds"
        else:
            continue
        raise InputError(f"{output_flag} {output} is {relation} {flag} {other}: writing there (or --overwrite) would "
                         f"change or delete {flag}. Choose an {output_flag} apart from it.")


def check_not_inside(output: str | os.PathLike, source: str | os.PathLike, output_flag: str, source_flag: str) -> None:
    """:func:`check_apart` for one input (the output is not the input, inside it, or around it)."""
    check_apart(output, output_flag, (source, source_flag))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled(folder: str | os.PathLike, what: str = "weights") -> None:
    """A folder whose weights are pickles only (``.bin`` ...) is refused: only safetensors are read."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InputError(f"{folder} holds {what} as {', '.join(pickled)}: refused, not safetensors (pickle files can "
                         "run code when loaded). Convert them to safetensors (e.g. `save_pretrained(..., "
                         "safe_serialization=True)` where you trust the file) and try again.")


__all__ = [
    "MAX_PROMPT_CHARS", "MAX_TEXT_BYTES", "InputError", "boolean", "check_apart", "check_bool", "check_not_inside",
    "check_number", "check_output_file", "check_output_folder", "finite_float", "fraction", "nonnegative_float", "nonnegative_int", "positive_float",
    "positive_int", "prompt_lines", "read_text_file", "refuse_pickled",
]
