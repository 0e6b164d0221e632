"""Hierarchical Position Pruning (HPP): from measured contributions to a :class:`PrunePlan`.

DESIGN.md section 6, steps 2-4, exactly:

* position weight ``W_pos(i) = exp(alpha * (i - |B|) / |B|)``; early blocks get small weights;
* prunability ``Score(i, c) = -|dP(i, c)| / W_pos(i)``; higher is removed first;
* with a target ratio ``r`` of the parameters of the whole transformer:
  ``r <= r_thres``: remove whole blocks in Score order, the set whose removed fraction is
  nearest ``r`` (see :func:`nearest_block_set`: every strategy lands at the same budget);
  ``r > r_thres``: remove whole blocks in Score order while the removed fraction stays
  <= r_thres, then components of the remaining blocks in Score order until >= r. A
  block whose residual branches are all gone becomes a removed block (its remaining
  parameters count as removed too), and a modulation whose readers are all gone is
  removed with them (it counts as removed: ``ModelFamily.unread_modulations``);
* with a memory budget instead: the same procedure, stopping when the estimated
  weight bytes fit.

Baselines for comparison (same inputs, same stopping rule, whole blocks only):
``bk-sdm`` (blocks by the drop of an alignment score of the final images, no position
weight), ``koala`` (blocks whose output is most similar to their input, by the cosine
similarity the analysis measured) and ``last`` (the last blocks). Each is a registered
:class:`~.strategies.Strategy` (:mod:`diffusers_hprune.planning.strategies`). A plan of
whole blocks only, for a target ratio, is the block set nearest the target: within
:data:`BUDGET_TOLERANCE` of it where the block sizes allow, so that plans of different
strategies are compared at the same parameter budget.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from diffusers_hprune.families import BLOCK
from diffusers_hprune.families.inventory import TransformerInventory
from diffusers_hprune.families.sizes import DTYPES, format_bytes
from diffusers_hprune.plan import PrunePlan
from diffusers_hprune.planning.strategies import RankingInputs, get_strategy, prunability
from diffusers_hprune.utils.errors import PlanError

DEFAULT_R_THRES = 0.25
#: How far (as a fraction of the parameters) a whole-block plan may land from its target ratio, where block sizes allow.
BUDGET_TOLERANCE = 0.02


def nearest_block_set(order: list[int], sizes: Mapping[int, int], total: int, ratio: float,
                      max_blocks: int, tolerance: float = BUDGET_TOLERANCE) -> list[int]:
    """The whole blocks to remove for ``ratio``, taken in ``order`` (first = removed first).

    Candidates, in this order of preference: the shortest prefix of ``order`` reaching
    ``ratio``; that prefix less its last block; and the ranked fill (blocks in order, one
    skipped where it would overshoot ``ratio + tolerance``, until ``ratio`` is reached). The
    first candidate within ``tolerance`` of ``ratio`` wins. Where none is (blocks of different
    sizes, e.g. FLUX's double- and single-stream blocks, ranked so that no run of them lands
    near the target), the sets that take the first ``k`` blocks of ``order`` of each block size
    are searched (skipped where the blocks have so many sizes that there would be more than
    :data:`_MAX_SIZE_SETS` such sets): of those within ``tolerance``, the one that reaches least far down ``order``
    wins (then the smaller sum of rank positions, then the nearer fraction). If no set is within
    ``tolerance``, the nearest one. At most ``max_blocks`` blocks; the result keeps ``order``.
    """
    def fraction(blocks):
        return sum(sizes[i] for i in blocks) / total

    def within(blocks):
        return abs(fraction(blocks) - ratio) <= tolerance + 1e-12

    prefix: list[int] = []
    for i in order:
        if fraction(prefix) >= ratio or len(prefix) == max_blocks:
            break
        prefix.append(i)
    fill: list[int] = []
    for i in order:
        if fraction(fill) >= ratio or len(fill) == max_blocks:
            break
        if fraction(fill + [i]) <= ratio + tolerance:
            fill.append(i)
    candidates = [blocks for blocks in (prefix, prefix[:-1], fill) if blocks]  # a plan removes something
    for blocks in candidates:
        if within(blocks):
            return blocks
    by_size = _size_class_sets(order, sizes, max_blocks)
    rank = {i: k for k, i in enumerate(order)}
    near = [blocks for blocks in by_size if within(blocks)]
    if near:
        return min(near, key=lambda b: (max(rank[i] for i in b), sum(rank[i] for i in b),
                                        abs(fraction(b) - ratio)))
    return min(candidates + by_size, key=lambda b: abs(fraction(b) - ratio))  # min keeps the first of equals


#: Above this many combinations of per-size counts the size-class search is skipped (blocks of many sizes).
_MAX_SIZE_SETS = 100_000


def _size_class_sets(order: list[int], sizes: Mapping[int, int], max_blocks: int) -> list[list[int]]:
    """Every set made of the first ``k_s`` blocks of ``order`` of each block size ``s`` (in ``order``)."""
    classes: dict[int, list[int]] = {}
    for i in order:
        classes.setdefault(sizes[i], []).append(i)
    lists = list(classes.values())
    if math.prod(len(blocks) + 1 for blocks in lists) > _MAX_SIZE_SETS:
        return []
    out = []
    for counts in itertools.product(*(range(len(blocks) + 1) for blocks in lists)):
        if 0 < sum(counts) <= max_blocks:
            chosen = {i for blocks, k in zip(lists, counts) for i in blocks[:k]}
            out.append([i for i in order if i in chosen])
    return out


@dataclass
class PlanOutcome:
    """A plan and what it achieves."""

    plan: PrunePlan
    removed_params: int
    total_params: int
    estimated_bytes: int
    weight_dtype: str
    order: list[tuple[int, str]] = field(default_factory=list)  # removals in the order they were chosen

    @property
    def ratio(self) -> float:
        return self.removed_params / self.total_params

    def summary(self) -> str:
        return (
            f"{self.plan.describe()}\nremoved {self.removed_params:,} of {self.total_params:,} parameters "
            f"({self.ratio:.2%}); estimated weights {format_bytes(self.estimated_bytes)} at {self.weight_dtype}"
        )


def make_plan(
    contributions: Mapping[tuple[int, str], float],
    inventory: TransformerInventory,
    *,
    ratio: float | None = None,
    memory_bytes: int | None = None,
    weight_dtype: str = "bf16",
    alpha: float | None = None,
    r_thres: float = DEFAULT_R_THRES,
    strategy: str = "hierarchical",
    similarity: Mapping[int, float] | None = None,
    alignment: Mapping[int, float] | None = None,
    metadata: Mapping | None = None,
) -> PlanOutcome:
    """Choose what to remove (see the module docstring).

    Args:
        contributions: ``(block index, component) -> dP`` (``"block"`` for whole blocks).
        inventory: parameter counts of the unpruned transformer (:func:`inspect_transformer`).
        ratio: target fraction of the transformer's parameters to remove, in (0, 1).
        memory_bytes: alternative target: estimated weight bytes at ``weight_dtype`` must fit.
        alpha: position-weight exponent; default: the family's (0.55 SD3, 0.01 FLUX).
        r_thres: above this ratio, components are removed after whole blocks (paper: 0.25).
        strategy: ``hierarchical`` (the paper), ``bk-sdm``, ``koala`` or ``last``.
        similarity: block index -> cosine similarity of its input and output (``koala`` only).
        alignment: block index -> dP of a text-image alignment score (``bk-sdm`` only;
            :meth:`ContributionReport.alignment_contributions`).
    """
    if (ratio is None) == (memory_bytes is None):
        raise PlanError("Give exactly one target: a ratio (--ratio) or a memory budget (--memory).")
    if ratio is not None and not 0 < ratio < 1:
        raise PlanError(f"The target ratio must lie in (0, 1), got {ratio}; e.g. 0.2 removes 20 % of the parameters.")
    if weight_dtype not in DTYPES:
        raise PlanError(f"Unknown weight dtype {weight_dtype!r}; choose one of {', '.join(DTYPES)}.")
    chosen = get_strategy(strategy)
    family = inventory.family
    alpha = family.default_alpha if alpha is None else alpha
    if not chosen.position_weight:
        alpha = 0.0
    n = len(inventory.blocks)
    total = inventory.original_params
    total_bytes = inventory.original_bytes[weight_dtype]
    sizes = {b.spec.index: b.nbytes[weight_dtype] for b in inventory.blocks}
    # What is removed so far: parameters and bytes (at weight_dtype) travel together.
    removed_b = 0

    if ratio is not None:
        def done(removed: int) -> bool:
            return removed / total >= ratio

        target = ratio
    else:
        if memory_bytes <= 0:
            raise PlanError(f"The memory budget must be positive, got {memory_bytes} bytes.")

        def done(removed: int) -> bool:
            return total_bytes - removed_b <= memory_bytes

        target = 1 - memory_bytes / total_bytes
        floor = total_bytes - sum(s[BLOCK] for s in sizes.values())
        if memory_bytes < floor:
            raise PlanError(
                f"No plan fits {format_bytes(memory_bytes)} at {weight_dtype}: the embeddings and output layers "
                f"alone take {format_bytes(floor)} and at least one block must stay; raise the budget or choose "
                "a smaller weight dtype (--weight-dtype nf4)."
            )
    if done(0):
        raise PlanError(
            f"The model already fits ({format_bytes(total_bytes)} at {weight_dtype} <= budget); nothing to prune."
        )

    stage_two = chosen.components and target > r_thres
    block_order = chosen.rank_blocks(RankingInputs(contributions, inventory, similarity, alpha, stage_two, alignment))
    blocks_only = ratio is not None and not stage_two  # a ratio met by whole blocks: the set nearest it
    if blocks_only:
        block_order = nearest_block_set(block_order, {b.spec.index: b.params for b in inventory.blocks}, total,
                                        ratio, n - 1)

    removed_blocks: set[int] = set()
    removed_components: dict[int, set[str]] = {}
    order: list[tuple[int, str]] = []
    removed = 0
    stage_one_limit = r_thres if stage_two else None

    def block_left(i: int) -> int:
        b = inventory.blocks[i]
        return b.params - sum(b.components[c] for c in removed_components.get(i, ()))

    for i in block_order:
        if (done(removed) and not blocks_only) or len(removed_blocks) == n - 1:
            break
        size = inventory.blocks[i].params
        if stage_one_limit is not None and (removed + size) / total > stage_one_limit:
            break
        removed_blocks.add(i)
        order.append((i, BLOCK))
        removed += size
        removed_b += sizes[i][BLOCK]

    if not done(removed) and stage_one_limit is not None:
        candidates = [
            (i, c)
            for i in range(n)
            if i not in removed_blocks
            for c in inventory.blocks[i].spec.components
        ]
        candidates.sort(key=lambda k: (-prunability(contributions[k], k[0], n, alpha), -k[0]))
        for i, c in candidates:
            if done(removed):
                break
            if i in removed_blocks or c in removed_components.get(i, ()):
                continue  # a whole block gone, or a modulation that went with its last reader
            spec = inventory.blocks[i].spec
            gone = removed_components.setdefault(i, set())
            if c in spec.branches and set(spec.branches) <= gone | {c}:
                if len(removed_blocks) == n - 1:
                    continue  # never remove the last block
                removed += block_left(i)
                removed_b += sizes[i][BLOCK] - sum(sizes[i][g] for g in gone)
                removed_blocks.add(i)
                del removed_components[i]
                order.append((i, BLOCK))
                continue
            # A modulation left without a reader goes with it (family.check_plan removes it too).
            for part in (c, *family.unread_modulations(spec, gone | {c})):
                gone.add(part)
                removed += inventory.blocks[i].components[part]
                removed_b += sizes[i][part]
                order.append((i, part))

    short = removed / total < ratio - BUDGET_TOLERANCE if blocks_only else not done(removed)
    if short and (not blocks_only or len(removed_blocks) == n - 1):
        what = f"{ratio:.0%} of the parameters" if ratio is not None else format_bytes(memory_bytes)
        raise PlanError(
            f"Cannot reach {what} with strategy {strategy!r} without removing every block (reached "
            f"{removed / total:.1%}); lower the target or choose the hierarchical strategy."
        )
    plan = PrunePlan(
        removed_blocks=sorted(removed_blocks),
        removed_components={i: sorted(c) for i, c in removed_components.items() if c},
        family=family.name,
        num_blocks=n,
        metadata=dict(metadata or {}, strategy=strategy, alpha=alpha, r_thres=r_thres,
                      target_ratio=ratio, memory_bytes=memory_bytes, weight_dtype=weight_dtype,
                      target_fraction=round(target, 6), achieved_ratio=round(removed / total, 6)),
    )
    return PlanOutcome(plan, removed, total, total_bytes - removed_b, weight_dtype, order)

