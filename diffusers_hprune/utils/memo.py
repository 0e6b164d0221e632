"""Bounded caches for the meta-device work that planning and the budget repeat.

Counting a transformer's parameters or tracing a call on the meta device builds the whole model
(about a second for SD3.5 Large; a distillation step's trace ten). ``hprune budget`` and the
``--gpu-memory`` fit of ``hprune compress`` ask the same few questions dozens of times. The
answers depend on the config's values only, so they are kept by the config's canonical text: a
changed config is a new question.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def config_key(config: Mapping[str, Any], drop: tuple[str, ...] = ()) -> str:
    """``config`` as canonical text: keys sorted, tuples as lists, ``drop`` and the bookkeeping keys
    (``_name_or_path``, ``_diffusers_version``...; all but ``_class_name``) left out."""
    kept = {k: v for k, v in config.items() if k not in drop and (k == "_class_name" or not k.startswith("_"))}
    return json.dumps(kept, sort_keys=True, default=repr)


class Memo(Generic[T]):
    """At most ``size`` answers, the oldest dropped first. Keep only immutable answers (or copy them out)."""

    def __init__(self, size: int = 32):
        self.size = size
        self._answers: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self._lock:
            if key in self._answers:
                return self._answers[key]
        value = compute()  # outside the lock: a slow computation does not hold up another key's
        with self._lock:
            if key not in self._answers and len(self._answers) >= self.size:
                self._answers.pop(next(iter(self._answers)))
            self._answers[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)


__all__ = ["Memo", "config_key"]
