"""`PrunePlan`: what to remove from a transformer, as a small validated JSON object.

Block indices are global execution-order indices: for SD3 the joint blocks
``0..num_layers-1``; for FLUX the double-stream blocks first, then the
single-stream blocks (FLUX.1: 0..18 double, 19..56 single).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from diffusers_hprune.utils.checks import InputError, read_text_file
from diffusers_hprune.utils.errors import PlanError
from diffusers_hprune.utils.fileio import atomic_write_json

PLAN_FORMAT = "diffusers-hprune/prune-plan"
PLAN_FORMAT_VERSION = 1

#: The most blocks a plan (or an analysis) may claim: far above any real model (FLUX.1 has 57), low enough
#: that a corrupt or hostile file cannot make anything that loops or allocates per block run away.
MAX_BLOCKS = 10_000

# family name -> its component vocabulary, as the family registry (diffusers_hprune.architecture, a layer
# above this module) reports it. A plan checks its names against it; the structure itself stays the family's.
_family_vocabularies: Callable[[], Mapping[str, Sequence[str]]] = dict


def use_family_registry(vocabularies: Callable[[], Mapping[str, Sequence[str]]]) -> None:
    """Called once by :mod:`diffusers_hprune.architecture`: where plans look up family names and components."""
    global _family_vocabularies
    _family_vocabularies = vocabularies


@dataclass
class PrunePlan:
    """What to remove from one transformer.

    Args:
        removed_blocks: global indices of blocks removed whole (the block becomes the identity).
        removed_components: block index -> canonical component names removed from that block
            (e.g. ``{12: ["ff_context"], 30: ["attn", "norm1"]}``); see DESIGN.md section 5.
        family: the name of the model family the plan was made for (a registered family, e.g. SD3's or FLUX's).
        num_blocks: the number of blocks of the transformer the plan was made for.
        metadata: free-form provenance (strategy, target ratio, ...); saved, never interpreted.

    The plan is validated and normalised on construction: indices must lie in
    ``[0, num_blocks)``, component names must belong to the family, at least one
    block must be kept; indices are sorted and de-duplicated, and components of a
    block that is removed whole are dropped (the block removal covers them).
    Checks that need the model itself (e.g. the last SD3 block has no
    ``ff_context``) are the family's (``ModelFamily.check_plan``) and happen when the plan is applied.
    """

    removed_blocks: list[int] = field(default_factory=list)
    removed_components: dict[int, list[str]] = field(default_factory=dict)
    _: KW_ONLY
    family: str
    num_blocks: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        families = _family_vocabularies()
        if not isinstance(self.family, str) or self.family not in families:
            raise PlanError(
                f"Unknown model family {self.family!r} in prune plan; supported families are "
                f"{', '.join(families)}. Make the plan with `family=` set to one of them."
            )
        if not _is_int(self.num_blocks) or not 1 <= self.num_blocks <= MAX_BLOCKS:
            raise PlanError(f"`num_blocks` must be a positive integer (at most {MAX_BLOCKS:,}), got "
                            f"{self.num_blocks!r}; it is the block count of the model the plan is for (FLUX.1: 57).")
        self.num_blocks = int(self.num_blocks)
        if not _is_list(self.removed_blocks):
            raise PlanError(f"`removed_blocks` must be a list of block indices (e.g. [3, 7]), got "
                            f"{_described(self.removed_blocks)}.")
        blocks = sorted({self._check_index(i, "removed_blocks") for i in self.removed_blocks})
        vocabulary = tuple(families[self.family])
        components: dict[int, list[str]] = {}
        if not isinstance(self.removed_components, Mapping):
            raise PlanError(
                "`removed_components` must map block indices to lists of component names (e.g. "
                f"{{\"12\": [\"ff_context\"]}}), got {_described(self.removed_components)}."
            )
        seen: dict[int, Any] = {}
        for key, names in self.removed_components.items():
            index = self._check_index(_key_index(key), "removed_components")
            if index in seen:  # "3" and "03" (or 3 and "3") are one block: which list was meant?
                raise PlanError(f"`removed_components` names block {index} twice ({seen[index]!r} and {key!r}); "
                                "give each block once, with all its components in one list.")
            seen[index] = key
            names = self._check_names(index, names, vocabulary)
            if index in blocks or not names:
                continue
            components[index] = sorted(set(names), key=vocabulary.index)
        if len(blocks) >= self.num_blocks:
            raise PlanError(
                f"The plan removes all {self.num_blocks} blocks; nothing would be left of the model. "
                "Keep at least one block (lower the target ratio)."
            )
        self.removed_blocks = blocks
        self.removed_components = dict(sorted(components.items()))
        if not isinstance(self.metadata, dict):
            raise PlanError(f"`metadata` must be a dict (a JSON object), got {_json_type(self.metadata)}.")

    def _check_index(self, value: Any, where: str) -> int:
        if not _is_int(value):
            hint = "; write the number without quotes" if isinstance(value, str) and _key_index(value) != value else ""
            raise PlanError(f"Block index {value!r} in `{where}` is not an integer ({_json_type(value)}){hint}.")
        index = int(value)
        if not 0 <= index < self.num_blocks:
            raise PlanError(
                f"Block index {index} in `{where}` is out of range: the {self.family!r} model this plan is for "
                f"has {self.num_blocks} blocks (valid indices 0..{self.num_blocks - 1})."
            )
        return index

    def _check_names(self, index: int, names: Any, vocabulary: tuple[str, ...]) -> list[str]:
        """The component names given for block ``index``: a list of strings (or one string), all in ``vocabulary``."""
        if isinstance(names, str):
            names = [names]
        if not _is_list(names) or not all(isinstance(n, str) for n in names):
            raise PlanError(
                f"`removed_components` of block {index} must be a list of component names (e.g. [\"ff\"]), got "
                f"{names!r}; valid names are {', '.join(vocabulary)}."
            )
        unknown = [n for n in names if n not in vocabulary]
        if unknown:
            raise PlanError(
                f"Unknown component name(s) {unknown} for block {index} in a {self.family!r} plan; "
                f"valid names are {', '.join(vocabulary)} (use `removed_blocks` to remove a whole block)."
            )
        return list(names)

    # ------------------------------------------------------------------ queries
    @property
    def is_empty(self) -> bool:
        """True when the plan removes nothing."""
        return not self.removed_blocks and not self.removed_components

    def kept_blocks(self) -> list[int]:
        """Indices of the blocks that are (at least partly) kept, in execution order."""
        removed = set(self.removed_blocks)
        return [i for i in range(self.num_blocks) if i not in removed]

    def first_pruned_block(self) -> int | None:
        """The lowest block index touched by the plan, or ``None`` for an empty plan."""
        touched = set(self.removed_blocks) | set(self.removed_components)
        return min(touched) if touched else None

    def describe(self) -> str:
        """The plan in words, e.g. ``sd3 (24 blocks): removes blocks 20, 22; removes 12: ff_context``."""
        what = []
        if self.removed_blocks:
            what.append("removes blocks " + ", ".join(map(str, self.removed_blocks)))
        if self.removed_components:
            what.append("removes " + "; ".join(f"{i}: {', '.join(c)}" for i, c in self.removed_components.items()))
        return f"{self.family} ({self.num_blocks} blocks): " + ("; ".join(what) or "removes nothing")

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (component keys become strings, as JSON requires)."""
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_FORMAT_VERSION,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "removed_blocks": list(self.removed_blocks),
            "removed_components": {str(i): list(c) for i, c in self.removed_components.items()},
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        """Build a plan from :meth:`to_dict` output (or the ``prune_plan`` entry of a model config)."""
        if isinstance(data, PrunePlan):
            return data
        if not isinstance(data, dict):
            raise PlanError(f"A prune plan must be a JSON object, got {type(data).__name__}.")
        if data.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise PlanError(f"Not a prune plan: format is {data.get('format')!r}, expected {PLAN_FORMAT!r}.")
        version = data.get("version", PLAN_FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise PlanError(f"Prune plan `version` must be a positive integer, got {_described(version)}; the file "
                            "is not a plan that `hprune plan` wrote, make the plan again.")
        if version > PLAN_FORMAT_VERSION:
            raise PlanError(
                f"Prune plan format version {version!r} is newer than this diffusers-hprune understands "
                f"({PLAN_FORMAT_VERSION}); upgrade with `pip install -U diffusers-hprune`."
            )
        missing = [k for k in ("family", "num_blocks") if k not in data]
        if missing:
            raise PlanError(f"Prune plan is missing the field(s) {missing}; it cannot be applied without them.")
        return cls(
            removed_blocks=data.get("removed_blocks", []),
            removed_components=data.get("removed_components", {}),
            family=data["family"],
            num_blocks=data["num_blocks"],
            metadata=_copied(data.get("metadata", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically); returns the path written."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> PrunePlan:
        """Read a plan written by :meth:`save` (a ``plan.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / "plan.json"
        if not path.exists():
            raise PlanError(f"No prune plan at {path}; make one with `hprune plan` or `PrunePlan(...).save()`.")
        try:
            text = read_text_file(path, "prune plan")
        except InputError as e:
            raise PlanError(str(e)) from None
        try:
            data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        except json.JSONDecodeError as e:
            raise PlanError(f"{path} is not valid JSON ({e}); the file is corrupt, make the plan again.") from None
        except _DuplicateKey as e:
            raise PlanError(f"{path} has the key {e.args[0]!r} twice in one object; JSON keeps only the last, so the "
                            "plan would silently lose the first. Give each key once.") from None
        return cls.from_dict(data)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_int(value: Any) -> bool:
    """An integer (Python's or numpy's), never a bool, a float or a string."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _copied(value: Any) -> Any:
    """A dict copied (the plan must not share the caller's), anything else as it is (``__post_init__`` refuses it)."""
    return dict(value) if isinstance(value, dict) else value


def _is_list(value: Any) -> bool:
    """A list of values (a JSON list; a tuple or set from Python), not a string or a mapping."""
    return isinstance(value, (list, tuple, set, frozenset, range))


def _key_index(key: Any) -> Any:
    """A ``removed_components`` key as a block index: JSON keys are strings, so ``"12"`` is block 12."""
    if isinstance(key, str) and re.fullmatch(r"-?\d+", key.strip()):
        return int(key)
    return key


def _described(value: Any) -> str:
    """``value`` with its JSON type, for a message: ``a string '12'``, ``null``."""
    return "null" if value is None else f"{_json_type(value)} {value!r}"


def _json_type(value: Any) -> str:
    """What ``value`` is, in JSON's words (a user wrote the file)."""
    names = {bool: "a boolean", str: "a string", int: "an integer", float: "a number", type(None): "null",
             dict: "an object", list: "a list"}
    return next((n for t, n in names.items() if isinstance(value, t)), type(value).__name__)
