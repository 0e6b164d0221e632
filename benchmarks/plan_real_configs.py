"""HPP plans for SD3.5 Large Turbo and FLUX.1-schnell from their public configs (no weights).

    python benchmarks/plan_real_configs.py

The analysis is SYNTHETIC (`hprune analyze CONFIG --synthetic`: later blocks matter less, as in
the paper), so the plans show what the planner does with the real parameter layout, not which
blocks of the real models matter. Weight bytes are analytic (diffusers_hprune.architecture.sizes): bf16,
and NF4 with double quantisation for the linear weights of the blocks (embedders, norm_out and
proj_out stay 16-bit).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import markdown_table, update_section

from diffusers_hprune.analysis import synthetic_report
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.planning import make_plan


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def ranges(indices) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    out, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out) or "-"


def main():
    rows = []
    for name in ("sd3.5-large-turbo", "flux.1-schnell"):
        report = synthetic_report(name)
        inventory = inspect_transformer(report.transformer_config)
        rows.append([name, "original", "-", "0.0 %", f"{inventory.original_params / 1e9:.3f} B",
                     gb(inventory.original_bytes["bf16"]), gb(inventory.original_bytes["nf4"]), "-"])
        for ratio in (0.2, 0.3):
            for strategy in ("hierarchical", "bk-sdm", "koala", "last"):
                outcome = make_plan(report.contributions(), inventory, ratio=ratio, strategy=strategy,
                                    similarity=report.similarity)
                pruned = inspect_transformer(dict(report.transformer_config, prune_plan=outcome.plan.to_dict()))
                if abs(pruned.removed_fraction - outcome.ratio) > 1e-9:
                    raise SystemExit("the planner's count and the pruned inventory disagree; not reporting")
                plan = outcome.plan
                n_comp = sum(len(v) for v in plan.removed_components.values())
                rows.append([name, f"{ratio:.0%}", strategy, f"{outcome.ratio:.2%}",
                             f"{pruned.params / 1e9:.3f} B", gb(pruned.nbytes("bf16")), gb(pruned.nbytes("nf4")),
                             f"{len(plan.removed_blocks)} blocks ({ranges(plan.removed_blocks)}) + {n_comp} components"
                             + (f" in blocks {ranges(plan.removed_components)}" if n_comp else "")])
        print(f"{name}: done", flush=True)
    body = markdown_table(["model", "target", "strategy", "removed", "params left", "weights bf16",
                           "weights NF4", "what goes"], rows)
    body += (
        "\n\nSynthetic analysis (seed 0), alpha = the family default (0.55 SD3, 0.01 FLUX), r_thres = 0.25. In a "
        "synthetic analysis the similarity is a function of the block's dP, so koala and bk-sdm choose alike; with "
        "measured analyses they differ (issue 7 compares them on the toys). Bytes "
        "are weights only (GB = 10^9 bytes); the paper's 3.24 GB / 4.44 GB are measured peaks, which include "
        "activations. The issue 7 memory table compares the two.\n"
    )
    update_section("plans-real-configs", "HPP plans on the public SD3.5 Large Turbo and FLUX.1-schnell configs", body)
    print(body)


if __name__ == "__main__":
    main()
