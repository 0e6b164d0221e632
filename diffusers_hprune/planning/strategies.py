"""The selection strategies ``make_plan`` can use: the method and the baselines, one registered object each.

A :class:`Strategy` says in which order whole blocks are removed, whether the position weight
applies and whether components are removed after ``r_thres`` (stage two, the method's
alone). ``register_strategy`` adds one (peft-style table: one entry per name, a duplicate is
refused); ``get_strategy`` / ``strategy_names`` look them up. Built in:

* ``hierarchical``: the paper's HPP, blocks then components by ``Score = -|dP| / W_pos``;
* ``bk-sdm``: whole blocks by the drop of a text-image alignment score of the final images
  when the block is removed (BK-SDM: CLIP score; on the toys ShapeEval, as no CLIP weights
  exist there), smallest drop first, no position weight, no components. It needs the
  alignment part of the analysis (``hprune analyze --alignment-metric auto``), or an analysis
  whose main metric is an alignment score;
* ``koala``: whole blocks whose output is most similar to their input (cosine), highest first;
* ``last``: the last blocks first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from diffusers_hprune.architecture import BLOCK
from diffusers_hprune.architecture.inventory import TransformerInventory
from diffusers_hprune.utils.errors import PlanError


def position_weight(index: int, num_blocks: int, alpha: float) -> float:
    """``W_pos(i) = exp(alpha * (i - |B|) / |B|)``."""
    if alpha < 0:
        raise PlanError(f"alpha must be >= 0 (got {alpha}); 0 ranks by contribution alone.")
    return math.exp(alpha * (index - num_blocks) / num_blocks)


def prunability(delta: float, index: int, num_blocks: int, alpha: float) -> float:
    """``Score(i, c) = -|dP(i, c)| / W_pos(i)``: higher means remove first."""
    return -abs(delta) / position_weight(index, num_blocks, alpha)


@dataclass(frozen=True)
class RankingInputs:
    """What a strategy may rank by."""

    contributions: Mapping[tuple[int, str], float]
    inventory: TransformerInventory
    similarity: Mapping[int, float] | None
    alpha: float
    stage_two: bool
    """Components will be removed after the blocks (their contributions must be there too)."""
    alignment: Mapping[int, float] | None = None
    """Block index -> dP of a text-image alignment score (what ``bk-sdm`` ranks by)."""


@dataclass(frozen=True)
class Strategy:
    """One way of choosing what to remove.

    Attributes:
        name: the ``--strategy`` value.
        description: one line for ``--help`` and docs.
        rank_blocks: the block indices in the order they are removed (first = removed first).
        position_weight: the family's alpha applies (otherwise alpha is 0).
        components: above ``r_thres``, components of the remaining blocks are removed after whole blocks.
    """

    name: str
    description: str
    rank_blocks: Callable[[RankingInputs], list[int]]
    position_weight: bool = False
    components: bool = False


_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the table; returns it. Raises :class:`PlanError` for a name already there."""
    if not isinstance(strategy, Strategy) or not strategy.name:
        raise PlanError(f"register_strategy takes a named Strategy, got {strategy!r}.")
    if strategy.name in _STRATEGIES:
        raise PlanError(f"A strategy named {strategy.name!r} is registered already; give the new one another name.")
    _STRATEGIES[strategy.name] = strategy
    return strategy


def strategy_names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise PlanError(f"Unknown strategy {name!r}; choose one of {', '.join(_STRATEGIES)}.") from None


def check_contributions(contributions: Mapping[tuple[int, str], float], inventory: TransformerInventory,
                        components: bool) -> None:
    """Raise :class:`PlanError` naming the block (and, with ``components``, component) entries that are missing."""
    needed = [(b.spec.index, BLOCK) for b in inventory.blocks]
    if components:
        needed += [(b.spec.index, c) for b in inventory.blocks for c in b.spec.components]
    missing = [k for k in needed if k not in contributions]
    if missing:
        shown = ", ".join(f"{i}:{c}" for i, c in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise PlanError(
            f"The analysis lacks {len(missing)} contribution(s) the planner needs ({shown}); "
            "finish the analysis (`hprune analyze` resumes where it stopped) or choose a block-only strategy."
        )


def _by_score(inputs: RankingInputs) -> list[int]:
    check_contributions(inputs.contributions, inputs.inventory, components=inputs.stage_two)
    n = len(inputs.inventory.blocks)
    # Ties go to the later block (the position-aware reading of the method).
    return sorted(range(n), key=lambda i: (-prunability(inputs.contributions[(i, BLOCK)], i, n, inputs.alpha), -i))


def _missing_blocks(values: Mapping[int, float] | None, n: int) -> list[int]:
    """The block indices ``values`` (a per-block measurement, or None) has no value for."""
    return [i for i in range(n) if values is None or i not in values]


def _by_alignment(inputs: RankingInputs) -> list[int]:
    n = len(inputs.inventory.blocks)
    alignment = inputs.alignment
    missing = _missing_blocks(alignment, n)
    if missing:
        raise PlanError(
            "The bk-sdm strategy ranks whole blocks by the drop of a text-image alignment score of the final images "
            f"(BK-SDM's CLIP score); the analysis lacks it for {len(missing)} block(s) (e.g. {missing[0]}). Analyse "
            "with `hprune analyze ... --alignment-metric auto` (ShapeEval on the toys, CLIP score on real models: "
            "give the CLIP model with --alignment-metric-arg model=PATH), or with --metric clip_score / shapeeval."
        )
    # The smallest drop first (a block whose removal raises the score first of all); ties: the later block.
    return sorted(range(n), key=lambda i: (alignment[i], -i))


def _by_similarity(inputs: RankingInputs) -> list[int]:
    n = len(inputs.inventory.blocks)
    similarity = inputs.similarity
    missing = _missing_blocks(similarity, n)
    if missing:
        raise PlanError(
            f"The koala strategy needs the input/output cosine similarity of every block; the analysis lacks "
            f"it for {len(missing)} block(s) (e.g. {missing[0]}). Re-run `hprune analyze` (it measures it in "
            "the full-model pass) or choose another strategy."
        )
    return sorted(range(n), key=lambda i: (-similarity[i], -i))


def _last_first(inputs: RankingInputs) -> list[int]:
    return list(range(len(inputs.inventory.blocks) - 1, -1, -1))


register_strategy(Strategy("hierarchical", "the paper: blocks, then (above r_thres) components, by -|dP| / W_pos",
                           _by_score, position_weight=True, components=True))
register_strategy(Strategy("bk-sdm", "whole blocks by the drop of a text-image alignment score (CLIP score; ShapeEval "
                           "on the toys), no position weight", _by_alignment))
register_strategy(Strategy("koala", "whole blocks by input/output cosine similarity, highest first", _by_similarity))
register_strategy(Strategy("last", "the last blocks first", _last_first))

__all__ = ["RankingInputs", "Strategy", "check_contributions", "get_strategy", "position_weight", "prunability",
           "register_strategy", "strategy_names"]
