"""Write a benchmark's section of BENCHMARKS.md (between its markers), with the command, machine and date."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from diffusers_hprune.utils.fileio import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery number here is written by a script in `benchmarks/`; none is typed in.\n"


def machine() -> str:
    threads = torch.get_num_threads()
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({threads} thread{'' if threads == 1 else 's'})")


def provenance() -> str:
    command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return f"Command: `{command}`  \nMachine: {machine()}  \nDate: {datetime.date.today().isoformat()}\n"


def update_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of BENCHMARKS.md."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    section = f"{begin}\n## {title}\n\n{provenance()}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(BENCHMARKS, text)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def ranks(values) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tied = values == v
        out[tied] = out[tied].mean()
    return out


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks); nan when one side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def depth_tag(families) -> str:
    """``"deep-"`` for the deep toys, ``""`` for the 12-block ones: their tables are separate sections of BENCHMARKS.md,
    side by side; a run over both kinds is refused (``SystemExit``)."""
    from diffusers_hprune import toy

    deep = {toy.toy_family(f) != f for f in families}
    if len(deep) > 1:
        raise SystemExit("--families: run the 12-block toys (sd3, flux) and the deep toys (sd3-deep, flux-deep) "
                         "separately; their tables are separate sections of BENCHMARKS.md")
    return "deep-" if deep == {True} else ""
