"""Options more than one command shares: sizes, ratios, image sizes, metric options, and the HPruneConfig flags.

Every numeric flag has an argparse type (:mod:`diffusers_hprune.utils.checks`), so a value that
cannot work (``--steps 0``, ``--ratio 1.5``, ``--pwp flase``) is an argparse error naming the flag,
before anything is loaded.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields

from diffusers_hprune.compression.config import HPruneConfig
from diffusers_hprune.utils.checks import (
    boolean,
    finite_float,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from diffusers_hprune.utils.errors import HPruneError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"4GB"`` -> 4e9, ``"3.5GiB"`` -> 3.5 * 2**30, ``"123"`` -> 123 (bytes)."""

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if unit and not unit.endswith("b"):
        unit += "b"
    if not m or unit not in _UNITS and unit:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size; write e.g. 4GB, 3.5GiB, 800MB or a number of bytes"
        )
    value = int(float(m.group(1)) * _UNITS[unit or "b"])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is no bytes; give a positive size, e.g. 4GB")
    return value


def card_memory(text: str) -> int:
    """A GPU's memory as cards are sold: ``"24GB"`` is 24 GiB (a card's GB are binary), as are ``"24"`` and
    ``"24GiB"``; ``"16384MB"`` is 16 GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2).lower() if m else "").removesuffix("b").removesuffix("i")
    scale = {"": 2**30, "g": 2**30, "m": 2**20, "t": 2**40}.get(unit)
    if not m or scale is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a GPU's memory; write e.g. 24GB or 16GB (a card's "
                                         "GB, read as GiB)")
    return int(float(m.group(1)) * scale)


def ratio(text: str) -> float:
    """A fraction of the parameters to remove: a number strictly between 0 and 1."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"must lie strictly between 0 and 1 (e.g. 0.3 removes 30% of the parameters), got {value:g}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a confidence)."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (e.g. 0.95), got {value:g}")
    return value


def add_generation_flags(parser: argparse.ArgumentParser, *, steps_help: str) -> None:
    """``--steps``, ``--height``, ``--width``, ``--guidance-scale``: the generation settings (default: the model's
    profile). Sizes must also be a multiple of what the model needs (16 for SD3 and FLUX.1, 4 for the toys),
    checked against the model before it runs."""
    parser.add_argument("--steps", type=positive_int, help=steps_help)
    parser.add_argument("--height", type=positive_int, help="image height in pixels, a multiple of 16 for SD3 and "
                        "FLUX.1 (4 for the toys) (default: the model's profile)")
    parser.add_argument("--width", type=positive_int, help="image width in pixels, like --height (default: the "
                        "model's profile)")
    parser.add_argument("--guidance-scale", type=nonnegative_float,
                        help="guidance scale, 0 or more (default: the model's profile; 0 = none)")


def metric_args(pairs: list[str]) -> dict:
    options = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HPruneError(f"--metric-arg takes KEY=VALUE, got {item!r}.")
        options[key] = value
    return options


def config_overrides(args: argparse.Namespace) -> dict:
    """The HPruneConfig fields given on the command line (flags from ``add_config_flags``)."""


    values = {f.name: getattr(args, f.name) for f in fields(HPruneConfig) if getattr(args, f.name, None) is not None}
    if getattr(args, "memory", None) is not None:
        values["ratio"] = None
    elif getattr(args, "ratio", None) is not None:
        values["memory"] = None
    if getattr(args, "quantize", None) is not None:
        values["quantize"] = args.quantize == "nf4"
    if getattr(args, "no_distill", False):
        values["distill"] = False
    return values


#: argparse types of the HPruneConfig fields whose values are not "an integer >= 1" or "any finite number"
#: (HPruneConfig checks them again, for configs built in Python or read from JSON).
_CONFIG_FLAG_TYPES = {
    "checkpointing_steps": nonnegative_int, "lora_rank": nonnegative_int, "seed": nonnegative_int,
    "learning_rate": positive_float, "max_train_minutes": positive_float, "r_thres": fraction,
}


def _config_flag_type(name: str, default):
    if name in _CONFIG_FLAG_TYPES:
        return _CONFIG_FLAG_TYPES[name]
    if isinstance(default, bool):
        return boolean
    if isinstance(default, int):
        return positive_int
    return str if isinstance(default, str) else finite_float


def add_config_flags(parser: argparse.ArgumentParser, defaults=None) -> None:
    """One flag per HPruneConfig field (``--max-train-steps`` ...); the help shows ``defaults``
    (an HPruneConfig; default: the dataclass's defaults). Flags not given stay None.

    Booleans take true/false (yes/no, on/off, 1/0; any other word is an error, never false);
    numbers are checked by their argparse types."""


    special = {"ratio", "memory", "quantize", "distill"}
    g = parser.add_argument_group("settings (HPruneConfig fields)" if defaults is not None else
                                  "settings (HPruneConfig fields; --config FILE gives them all)")
    for f in fields(HPruneConfig):
        if f.name in special:
            continue
        default = f.default if f.default is not MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        kind = _config_flag_type(f.name, f.default if f.default is not MISSING else default)
        flag = "--" + f.name.replace("_", "-")
        metavar = "true|false" if kind is boolean else None
        g.add_argument(flag, dest=f.name, type=kind, metavar=metavar, help=f"default {default}")
