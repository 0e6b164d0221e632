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

from diffusers_hprune.architecture import BLOCK
from diffusers_hprune.architecture.inventory import TransformerInventory
from diffusers_hprune.architecture.sizes import DTYPES, format_bytes
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
    _check_target(ratio, memory_bytes, weight_dtype)
    chosen = get_strategy(strategy)
    family = inventory.family
    alpha = 0.0 if not chosen.position_weight else family.default_alpha if alpha is None else alpha
    removal = _Removal(inventory, weight_dtype, ratio, memory_bytes)
    if removal.done():
        raise PlanError(f"The model already fits ({format_bytes(removal.total_bytes)} at {weight_dtype} <= budget); "
                        "nothing to prune.")
    stage_two = chosen.components and removal.target > r_thres
    block_order = chosen.rank_blocks(RankingInputs(contributions, inventory, similarity, alpha, stage_two, alignment))
    blocks_only = ratio is not None and not stage_two  # a ratio met by whole blocks: the set nearest it
    if blocks_only:
        block_order = nearest_block_set(block_order, {b.spec.index: b.params for b in inventory.blocks},
                                        removal.total, ratio, removal.n - 1)
    removal.whole_blocks(block_order, limit=r_thres if stage_two else None, until_done=not blocks_only)
    if stage_two and not removal.done():
        removal.components(contributions, alpha)
    removal.check_reached(blocks_only, strategy)
    plan = PrunePlan(
        removed_blocks=sorted(removal.blocks),
        removed_components={i: sorted(c) for i, c in removal.parts.items() if c},
        family=family.name,
        num_blocks=removal.n,
        metadata=dict(metadata or {}, strategy=strategy, alpha=alpha, r_thres=r_thres,
                      target_ratio=ratio, memory_bytes=memory_bytes, weight_dtype=weight_dtype,
                      target_fraction=round(removal.target, 6),
                      achieved_ratio=round(removal.params / removal.total, 6)),
    )
    return PlanOutcome(plan, removal.params, removal.total, removal.total_bytes - removal.bytes, weight_dtype,
                       removal.order)


def _check_target(ratio: float | None, memory_bytes: int | None, weight_dtype: str) -> None:
    if (ratio is None) == (memory_bytes is None):
        raise PlanError("Give exactly one target: a ratio (--ratio) or a memory budget (--memory).")
    if ratio is not None and not 0 < ratio < 1:
        raise PlanError(f"The target ratio must lie in (0, 1), got {ratio}; e.g. 0.2 removes 20 % of the parameters.")
    if weight_dtype not in DTYPES:
        raise PlanError(f"Unknown weight dtype {weight_dtype!r}; choose one of {', '.join(DTYPES)}.")
    if memory_bytes is not None and memory_bytes <= 0:
        raise PlanError(f"The memory budget must be positive, got {memory_bytes} bytes.")


class _Removal:
    """What a plan removes so far, in parameters and in bytes at the weight dtype, and whether the target is met."""

    def __init__(self, inventory: TransformerInventory, weight_dtype: str, ratio: float | None,
                 memory_bytes: int | None):
        self.inventory, self.weight_dtype, self.ratio, self.memory_bytes = inventory, weight_dtype, ratio, memory_bytes
        self.n = len(inventory.blocks)
        self.total = inventory.original_params
        self.total_bytes = inventory.original_bytes[weight_dtype]
        self.sizes = {b.spec.index: b.nbytes[weight_dtype] for b in inventory.blocks}
        self.params = self.bytes = 0
        self.blocks: set[int] = set()
        self.parts: dict[int, set[str]] = {}
        self.order: list[tuple[int, str]] = []
        if ratio is not None:
            self.target = ratio
        else:
            self.target = 1 - memory_bytes / self.total_bytes
            floor = self.total_bytes - sum(s[BLOCK] for s in self.sizes.values())
            if memory_bytes < floor:
                raise PlanError(
                    f"No plan fits {format_bytes(memory_bytes)} at {weight_dtype}: the embeddings and output layers "
                    f"alone take {format_bytes(floor)} and at least one block must stay; raise the budget or choose "
                    "a smaller weight dtype (--weight-dtype nf4)."
                )

    def done(self) -> bool:
        if self.ratio is not None:
            return self.params / self.total >= self.ratio
        return self.total_bytes - self.bytes <= self.memory_bytes

    def _block_left(self, i: int) -> int:
        b = self.inventory.blocks[i]
        return b.params - sum(b.components[c] for c in self.parts.get(i, ()))

    def whole_blocks(self, block_order: list[int], *, limit: float | None, until_done: bool) -> None:
        """Stage one: whole blocks in ``block_order`` until the target (``until_done``), or until the next would
        pass ``limit`` (a fraction of the parameters), never the last block."""
        for i in block_order:
            if (until_done and self.done()) or len(self.blocks) == self.n - 1:
                break
            size = self.inventory.blocks[i].params
            if limit is not None and (self.params + size) / self.total > limit:
                break
            self.blocks.add(i)
            self.order.append((i, BLOCK))
            self.params += size
            self.bytes += self.sizes[i][BLOCK]

    def components(self, contributions: Mapping[tuple[int, str], float], alpha: float) -> None:
        """Stage two: components of the remaining blocks by prunability until the target."""
        n, family = self.n, self.inventory.family
        candidates = [(i, c) for i in range(n) if i not in self.blocks for c in self.inventory.blocks[i].spec.components]
        candidates.sort(key=lambda k: (-prunability(contributions[k], k[0], n, alpha), -k[0]))
        for i, c in candidates:
            if self.done():
                break
            if i in self.blocks or c in self.parts.get(i, ()):
                continue  # a whole block gone, or a modulation that went with its last reader
            spec = self.inventory.blocks[i].spec
            gone = self.parts.setdefault(i, set())
            if c in spec.branches and set(spec.branches) <= gone | {c}:
                if len(self.blocks) == n - 1:
                    continue  # never remove the last block
                self.params += self._block_left(i)
                self.bytes += self.sizes[i][BLOCK] - sum(self.sizes[i][g] for g in gone)
                self.blocks.add(i)
                del self.parts[i]
                self.order.append((i, BLOCK))
                continue
            # A modulation left without a reader goes with it (family.check_plan removes it too).
            for part in (c, *family.unread_modulations(spec, gone | {c})):
                gone.add(part)
                self.params += self.inventory.blocks[i].components[part]
                self.bytes += self.sizes[i][part]
                self.order.append((i, part))

    def check_reached(self, blocks_only: bool, strategy: str) -> None:
        short = self.params / self.total < self.ratio - BUDGET_TOLERANCE if blocks_only else not self.done()
        if short and (not blocks_only or len(self.blocks) == self.n - 1):
            what = f"{self.ratio:.0%} of the parameters" if self.ratio is not None else format_bytes(self.memory_bytes)
            raise PlanError(
                f"Cannot reach {what} with strategy {strategy!r} without removing every block (reached "
                f"{self.params / self.total:.1%}); lower the target or choose the hierarchical strategy."
            )

