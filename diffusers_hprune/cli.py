"""The ``hprune`` command line: builds the parser from the subcommands in :mod:`diffusers_hprune.commands` and dispatches."""

from __future__ import annotations

import argparse
import errno
import os
import sys

import diffusers
import transformers

from diffusers_hprune import __version__
from diffusers_hprune.commands import COMMANDS
from diffusers_hprune.utils.distributed import end_processes
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.interrupts import termination_raises
from diffusers_hprune.utils.quiet import quiet_third_party_notices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hprune",
        description="HierarchicalPrune for Diffusers SD3/SD3.5 and FLUX.1 transformers.",
    )
    parser.add_argument("--version", action="version", version=f"diffusers-hprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Only the command's own progress: no per-file loading bars, no notices that do not concern the user.

    ``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY`` set by the user win.
    """
    quiet_third_party_notices()
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        transformers.utils.logging.set_verbosity_error()
    if "DIFFUSERS_VERBOSITY" not in os.environ:
        diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


#: "No space left on device" and "Disk quota exceeded", as errno values and as safetensors' messages name them.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException) -> bool:
    """Whether ``e`` says the disk (or the user's quota) is full: an ``OSError``, or safetensors' own error."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    return type(e).__name__ == "SafetensorError" and any(f"os error {n})" in str(e) for n in DISK_FULL)


def describe_os_error(e: BaseException, output: str | os.PathLike | None = None) -> str:
    """A file-system or encoding error as one line that names the path and what to do (for a full disk: the
    command's ``output``, since the file an error names may be the one being copied from)."""
    if disk_full(e):
        where = f" holding {output}" if output else ""
        return (f"no space left on the device{where} (or the user's quota is used up); no partial output was left "
                "there (a distillation keeps the checkpoints it finished). Free some space or write elsewhere, then "
                "run the command again.")
    if isinstance(e, UnicodeError):
        return f"a file is not UTF-8 text ({e}); save it as UTF-8 and try again."
    name = getattr(e, "filename", None)
    what = getattr(e, "strerror", None) or str(e)
    where = f" {name}" if name else ""
    if isinstance(e, PermissionError):
        return f"cannot access{where}: {what}; choose a path this user can read or write, or change its permissions."
    return f"cannot use{where}: {what}; check the path (a file where a folder is needed, or the reverse?)."


def _output_of(args: argparse.Namespace) -> str | None:
    """What the command writes (``--out``, or ``--output_dir`` for distill), for the message of a full disk."""
    for name in ("out", "output_dir"):
        value = getattr(args, name, None)
        if value:
            return str(value)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        with termination_raises():  # SIGTERM runs the cleanup of what the command was writing, as Ctrl-C does
            code = args.func(args)
    except HPruneError as e:
        print(f"hprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the net under the checks made where inputs enter (and safetensors' full-disk error)
        if not (isinstance(e, (OSError, UnicodeError)) or disk_full(e)):
            raise
        print(f"hprune {args.command}: error: {describe_os_error(e, _output_of(args))}", file=sys.stderr)
        return 2
    end_processes()  # under `accelerate launch`: every rank ends here, together
    return code


if __name__ == "__main__":
    sys.exit(main())
