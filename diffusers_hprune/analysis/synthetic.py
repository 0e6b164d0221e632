"""Synthetic contribution reports: planning and memory estimates for models whose weights are not here."""

from __future__ import annotations

import itertools
import json
import math

from diffusers_hprune.architecture import BLOCK, get_family
from diffusers_hprune.architecture.inventory import load_transformer_config
from diffusers_hprune.contributions import ContributionReport, architecture_hash

# Relative weight of each component's dP in a synthetic analysis (modulations and attention
# matter most, the text-stream MLP least), loosely following the paper's Fig. 8.
_SYNTHETIC_COMPONENT_WEIGHT = {"norm1": 0.8, "norm": 0.8, "attn": 0.6, "ff": 0.35, "mlp": 0.35,
                               "norm1_context": 0.25, "ff_context": 0.15}


def synthetic_report(source, seed: int = 0, pairs: bool = False) -> ContributionReport:
    """A made-up analysis shaped like the paper's (later blocks matter less), from a config alone.

    For planning and memory estimates of models whose weights are not here (SD3.5 Large
    Turbo, FLUX.1-schnell): ``dP(i, block) = 0.02 + exp(-4 i / (|B| - 1))`` with +-25 %
    seeded noise; a component's dP is its block's times a fixed weight per kind, with noise.
    Marked ``"metric": {"name": "synthetic"}`` so it is never mistaken for a measurement. Its
    alignment part (for ``bk-sdm``) is the block dPs with their own +-25 % noise.
    """
    import random

    config = {k: v for k, v in load_transformer_config(source).items() if k != "prune_plan"}
    family = get_family(config)
    specs = family.block_specs(config)
    n = len(specs)
    rng = random.Random(seed)
    report = ContributionReport(
        family=family.name,
        num_blocks=n,
        model=str(config.get("_name_or_path") or source),
        fingerprint="synthetic-" + architecture_hash(config),
        transformer_config=json.loads(json.dumps(config, default=str)),
        metric={"name": "synthetic", "options": {"seed": seed}},
        calibration={"synthetic": "dP(i, block) = 0.02 + exp(-4 i / (|B| - 1)), +-25 % noise; components: fixed share"},
        pairs=pairs,
        baseline_score=1.0,
    )
    for spec in specs:
        depth = spec.index / max(1, n - 1)
        block = 0.02 + math.exp(-4 * depth) * (1 + 0.25 * rng.uniform(-1, 1))
        values = {BLOCK: block}
        for c in spec.components:
            values[c] = block * _SYNTHETIC_COMPONENT_WEIGHT.get(c, 0.5) * (1 + 0.25 * rng.uniform(-1, 1))
        if pairs:
            for a, b in itertools.combinations(spec.components, 2):
                values[f"{a}+{b}"] = min(block, values[a] + values[b])
        for c, d in values.items():
            report.entries[(spec.index, c)] = {"score": 1.0 - d, "delta": d}
        report.similarity[spec.index] = 1.0 - 0.1 * block
        aligned = block * (1 + 0.25 * rng.uniform(-1, 1))
        report.alignment.setdefault("blocks", {})[spec.index] = {"score": 1.0 - aligned, "delta": aligned}
    report.alignment.update(metric={"name": "synthetic", "options": {"seed": seed}}, baseline_score=1.0)
    return report
