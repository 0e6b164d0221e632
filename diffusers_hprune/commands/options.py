"""Options more than one command shares: sizes, metric options, and the HPruneConfig flags."""

from __future__ import annotations

import argparse
import re
from dataclasses import MISSING, fields

from diffusers_hprune.compress.config import HPruneConfig
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
    return int(float(m.group(1)) * _UNITS[unit or "b"])


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


def add_config_flags(parser: argparse.ArgumentParser, defaults=None) -> None:
    """One flag per HPruneConfig field (``--max-train-steps`` ...); the help shows ``defaults``
    (an HPruneConfig; default: the dataclass's defaults). Flags not given stay None."""


    special = {"ratio", "memory", "quantize", "distill"}
    g = parser.add_argument_group("settings (HPruneConfig fields)" if defaults is not None else
                                  "settings (HPruneConfig fields; --config FILE gives them all)")
    for f in fields(HPruneConfig):
        if f.name in special:
            continue
        default = f.default if f.default is not MISSING else None
        if defaults is not None:
            default = getattr(defaults, f.name)
        kind = {"bool": None, "int": int, "float": float, "str": str}.get(type(default).__name__, float)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            g.add_argument(flag, dest=f.name, type=lambda v: v.lower() in ("1", "true", "yes", "on"),
                           metavar="true|false", help=f"default {default}")
        else:
            g.add_argument(flag, dest=f.name, type=kind or float, help=f"default {default}")
