"""Which contribution entries a plan's decision still depends on: the stopping rule of the adaptive analysis.

``PlanDecisions`` answers the analysis's question (its ``StoppingRule`` protocol, :mod:`diffusers_hprune.analysis.
adaptive`) with the planner as a black box: an entry is decided when moving its dP to either end of its interval
(and to 0 where the interval spans 0: the Score ranks by ``|dP|``), every other entry at its estimate, leaves the
plan at every ratio asked for unchanged. A plan takes well under a millisecond, so a round's decision over a few
hundred entries and three ratios takes about a second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from diffusers_hprune.architecture.inventory import TransformerInventory
from diffusers_hprune.planning.hpp import DEFAULT_R_THRES, make_plan
from diffusers_hprune.utils.errors import PlanError

#: The ratios an adaptive analysis decides for when none are given: the range the paper and BENCHMARKS.md use.
DEFAULT_RATIOS = (0.2, 0.3, 0.4)

Key = tuple[int, str]


class PlanDecisions:
    """The entries whose dP could still change the plan at one of ``ratios`` (``strategy``, ``alpha``, ``r_thres``
    as ``make_plan`` takes them)."""

    def __init__(self, inventory: TransformerInventory, ratios: Sequence[float] = DEFAULT_RATIOS, *,
                 strategy: str = "hierarchical", alpha: float | None = None, r_thres: float = DEFAULT_R_THRES):
        if not ratios:
            raise PlanError("An adaptive analysis needs at least one ratio to decide for (e.g. 0.3).")
        for ratio in ratios:
            if not 0 < ratio < 1:
                raise PlanError(f"The ratios an adaptive analysis decides for must lie in (0, 1), got {ratio}.")
        self.inventory, self.ratios = inventory, sorted(set(float(r) for r in ratios))
        self.options = {"strategy": strategy, "alpha": alpha, "r_thres": r_thres}

    def plans(self, contributions: Mapping[Key, float]) -> list[tuple]:
        """What the plan at each ratio removes (whole blocks, then components), comparable with ``==``."""
        out = []
        for ratio in self.ratios:
            plan = make_plan(contributions, self.inventory, ratio=ratio, **self.options).plan
            out.append((tuple(plan.removed_blocks), tuple(sorted((i, tuple(c)) for i, c in
                                                                 plan.removed_components.items()))))
        return out

    def undecided(self, estimates: Mapping[Key, float], intervals: Mapping[Key, tuple[float, float]]) -> set[Key]:
        base = self.plans(estimates)
        trial = dict(estimates)
        out = set()
        for key, (low, high) in intervals.items():
            points = [low, high] + ([0.0] if low < 0 < high else [])
            for value in points:
                trial[key] = value
                if self.plans(trial) != base:
                    out.add(key)
                    break
            trial[key] = estimates[key]
        return out


__all__ = ["DEFAULT_RATIOS", "PlanDecisions"]
