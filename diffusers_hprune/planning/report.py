"""Figures and a text table of a contribution analysis (``hprune report``), with a plan marked.

* ``blocks.png``: dP of removing each whole block, bars in execution order (paper Fig. 4);
  with a plan, removed blocks are red and blocks losing components orange. A second panel
  shows the prunability score ``-|dP| / W_pos`` the planner ranks by.
* ``components.png``: one heatmap row per component kind, one column per block (paper
  Fig. 8); removed entries are crossed.
* ``pairs.png`` (analyses made with ``--pairs``): joint removal of two components (Figs. 9, 11).
* ``similarity.png``: input/output cosine similarity per block (what ``koala`` ranks by).
* ``table.txt``: the numbers, one row per block.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers_hprune.architecture import BLOCK
from diffusers_hprune.contributions import ContributionReport
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning.strategies import prunability
from diffusers_hprune.utils.fileio import atomic_path, atomic_write_text


def _status(plan: PrunePlan | None, index: int, component: str = BLOCK) -> str:
    if plan is None:
        return ""
    if index in plan.removed_blocks:
        return "removed"
    gone = plan.removed_components.get(index, [])
    if component == BLOCK:
        return "pruned" if gone else ""
    parts = component.split("+")
    return "removed" if all(p in gone for p in parts) else ""


def format_table(report: ContributionReport, plan: PrunePlan | None = None, alpha: float | None = None) -> str:
    """One row per block: dP of the whole block and of each component (``*`` marks what the plan removes)."""
    family = report.model_family
    specs = family.block_specs(report.transformer_config)
    alpha = family.default_alpha if alpha is None else alpha
    names = [BLOCK] + list(family.component_names)
    deltas = report.contributions()
    header = ["block", "path", f"score(a={alpha:g})"] + names + ["cosine"]
    rows = []
    for spec in specs:
        score = prunability(deltas[(spec.index, BLOCK)], spec.index, len(specs), alpha) if (spec.index, BLOCK) in deltas else None
        cells = [str(spec.index), spec.path, "" if score is None else f"{score:.4g}"]
        for c in names:
            if (spec.index, c) not in deltas:
                cells.append("")
                continue
            mark = "*" if _status(plan, spec.index, c) == "removed" else ""
            early = "~" if report.stopped_early((spec.index, c)) else ""
            cells.append(f"{early}{deltas[(spec.index, c)]:.4g}{mark}")
        cos = report.similarity.get(spec.index)
        cells.append("" if cos is None else f"{cos:.4f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    metric = report.metric["name"]
    out = [
        f"contribution analysis of {report.model} ({family.display_name}, {report.num_blocks} blocks), metric {metric}",
        f"P(original) = {report.baseline_score}; dP = P(original) - P(without the component); "
        f"{len(report.entries)} of {len(report.expected_keys())} entries"
        + ("" if report.complete else " (INCOMPLETE: resume with `hprune analyze`)"),
    ]
    early = [k for k in report.entries if report.stopped_early(k)]
    if early:
        used = sum(report.images_of(k) for k in report.entries)
        out.append(f"adaptive analysis: {len(early)} entries stopped before all their images ('~': their dP is an "
                   f"estimate, its interval in the file); {used:,} of "
                   f"{sum(report.entry_images(k) for k in report.entries):,} entry images measured")
    if plan is not None:
        out.append(f"plan: {plan.describe()}  ('*' marks what it removes)")
    out += ["", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out) + "\n"


def _colours(plan, specs):
    colours = []
    for spec in specs:
        s = _status(plan, spec.index)
        colours.append({"removed": "tab:red", "pruned": "tab:orange"}.get(s, "tab:blue"))
    return colours


def write_report(report: ContributionReport, out_dir: str | os.PathLike, plan: PrunePlan | None = None,
                 alpha: float | None = None) -> list[Path]:
    """Write the figures and the table into ``out_dir``; returns the written paths."""
    family = report.model_family
    if plan is not None:
        plan = family.check_plan(plan, report.transformer_config)
    alpha = family.default_alpha if alpha is None else alpha
    figures = _Figures(report, Path(out_dir), plan)
    figures.blocks(alpha)
    figures.heatmap(list(family.component_names), "components.png", "dP per component", "viridis", marks=True)
    pair_names = sorted({c for (_, c) in figures.deltas if "+" in c})
    if pair_names:
        figures.heatmap(pair_names, "pairs.png", "dP of removing two components together", "magma", marks=False)
    if report.similarity:
        figures.similarity()
    return figures.written + [atomic_write_text(Path(out_dir) / "table.txt", format_table(report, plan, alpha))]


class _Figures:
    """The figures of one analysis (matplotlib, without a display), each written atomically into ``out_dir``."""

    def __init__(self, report: ContributionReport, out_dir: Path, plan: PrunePlan | None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        self.plt, self.np = plt, np
        self.report, self.out_dir, self.plan = report, out_dir, plan
        family = report.model_family
        self.specs = family.block_specs(report.transformer_config)
        self.deltas = report.contributions(pairs=True)
        self.n = len(self.specs)
        self.x = np.arange(self.n)
        self.colours = _colours(plan, self.specs)
        model = Path(report.model).name if Path(report.model).exists() else report.model  # a local path: its folder
        self.title = f"{model} ({family.display_name}), metric {report.metric['name']}"
        self.written: list[Path] = []

    def _save(self, fig, name: str) -> None:
        path = self.out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        self.plt.close(fig)
        self.written.append(path)

    def _block_axis(self, ax) -> None:
        ax.set_xlabel("block (execution order)")
        ax.set_xticks(self.x, [str(i) for i in self.x], fontsize=7)

    def blocks(self, alpha: float) -> None:
        """dP of removing each whole block, and the Score planning ranks by."""
        np, n = self.np, self.n
        fig, axes = self.plt.subplots(2, 1, figsize=(max(6, n * 0.35), 6), sharex=True)
        block_d = [self.deltas.get((s.index, BLOCK), np.nan) for s in self.specs]
        axes[0].bar(self.x, block_d, color=self.colours)
        axes[0].set_ylabel("dP (remove block)")
        axes[0].set_title(self.title)
        scores = [prunability(d, i, n, alpha) if np.isfinite(d) else np.nan for i, d in enumerate(block_d)]
        axes[1].bar(self.x, scores, color=self.colours)
        axes[1].set_ylabel(f"Score = -|dP|/W_pos (alpha={alpha:g})")
        self._block_axis(axes[1])
        if self.plan is not None:
            from matplotlib.patches import Patch

            axes[0].legend(handles=[Patch(color="tab:red", label="removed block"), Patch(color="tab:orange",
                           label="components removed"), Patch(color="tab:blue", label="kept")], fontsize=7)
        self._save(fig, "blocks.png")

    def heatmap(self, rows: list[str], name: str, what: str, cmap: str, marks: bool) -> None:
        """dP of each row's removal (a component, or a pair) in every block; a log scale over a wide range."""
        from matplotlib.colors import LogNorm

        np, plan, deltas = self.np, self.plan, self.deltas
        grid = np.full((len(rows), self.n), np.nan)
        for r, c in enumerate(rows):
            for s in self.specs:
                if (s.index, c) in deltas:
                    grid[r, s.index] = deltas[(s.index, c)]
        fig, ax = self.plt.subplots(figsize=(max(6, self.n * 0.35), 1 + 0.45 * len(rows)))
        finite = grid[np.isfinite(grid)]
        log = finite.size > 0 and finite.min() > 0 and finite.max() / finite.min() > 100
        im = ax.imshow(grid, aspect="auto", cmap=cmap, norm=LogNorm() if log else None)
        fig.colorbar(im, ax=ax, label="dP (log scale)" if log else "dP")
        ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 8 else None)
        self._block_axis(ax)
        ax.set_title(f"{what} - {self.title}", fontsize=9)
        if marks and plan is not None:
            for r, c in enumerate(rows):
                for s in self.specs:
                    if (s.index, c) in deltas and (_status(plan, s.index, c) == "removed"
                                                   or s.index in plan.removed_blocks):
                        ax.plot(s.index, r, marker="x", color="red", markersize=8, mew=2)
        self._save(fig, name)

    def similarity(self) -> None:
        """Each block's input/output cosine similarity (what koala ranks by)."""
        similarity = self.report.similarity
        fig, ax = self.plt.subplots(figsize=(max(6, self.n * 0.35), 3))
        ax.bar(self.x, [similarity.get(s.index, self.np.nan) for s in self.specs], color=self.colours)
        ax.set_ylabel("cos(input, output)")
        self._block_axis(ax)
        lo = self.np.nanmin(list(similarity.values()))
        ax.set_ylim(max(0.0, lo - 0.05), 1.0)
        ax.set_title(f"block input/output similarity (koala ranks by it) - {self.title}", fontsize=9)
        self._save(fig, "similarity.png")
