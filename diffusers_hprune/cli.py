"""The ``hprune`` command line: builds the parser from the subcommands in :mod:`diffusers_hprune.commands` and dispatches."""

from __future__ import annotations

import argparse
import os
import sys

import diffusers
import transformers

from diffusers_hprune import __version__
from diffusers_hprune.commands import COMMANDS
from diffusers_hprune.utils.distributed import end_processes
from diffusers_hprune.utils.errors import HPruneError
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


def describe_os_error(e: BaseException) -> str:
    """A file-system or encoding error as one line that names the path and what to do."""
    if isinstance(e, UnicodeError):
        return f"a file is not UTF-8 text ({e}); save it as UTF-8 and try again."
    name = getattr(e, "filename", None)
    what = getattr(e, "strerror", None) or str(e)
    where = f" {name}" if name else ""
    if isinstance(e, PermissionError):
        return f"cannot access{where}: {what}; choose a path this user can read or write, or change its permissions."
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        return f"no space left on the device writing{where}; free some space or write elsewhere."
    return f"cannot use{where}: {what}; check the path (a file where a folder is needed, or the reverse?)."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        code = args.func(args)
    except HPruneError as e:
        print(f"hprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, UnicodeError) as e:  # the net under the checks made where inputs enter
        print(f"hprune {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    end_processes()  # under `accelerate launch`: every rank ends here, together
    return code


if __name__ == "__main__":
    sys.exit(main())
