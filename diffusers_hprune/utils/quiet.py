"""Silence third-party notices that do not concern ``hprune`` users (command line only).

On a CPU machine, importing Diffusers' SD3/FLUX modules makes bitsandbytes log that its
optional CPU kernel package is missing (4-bit still works without it) and transformers log
that torchvision is missing (the PIL image processors serve instead). The ``hprune`` command
drops exactly these messages, before
the package imports Diffusers. Library users keep their own logging untouched.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

_DROPPED = ("requires torchvision (not installed)",)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _DROPPED)


def running_as_cli() -> bool:
    """True while the ``hprune`` script or ``python -m diffusers_hprune`` starts."""
    return sys.argv[:1] == ["-m"] or (bool(sys.argv) and Path(sys.argv[0]).name in ("hprune", "hprune.exe"))


def quiet_third_party_notices() -> None:
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if bnb.level == logging.NOTSET:
        bnb.setLevel(logging.ERROR)
    transformers_logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropNotices) for f in transformers_logger.filters):
        transformers_logger.addFilter(_DropNotices())
