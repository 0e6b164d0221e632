"""``HPruneConfig``: the method's hyper-parameters for a whole compression run, with a JSON round trip."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from diffusers_hprune.families.sizes import DTYPES
from diffusers_hprune.planning.strategies import strategy_names
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json

FORMAT = "diffusers-hprune/config"
VERSION = 1


class ConfigError(HPruneError):
    """Hyper-parameters that do not make sense together, or a config file that cannot be read."""


@dataclass
class HPruneConfig:
    """Every setting of ``hprune compress`` (analysis, HPP, distillation, quantisation, evaluation).

    One target: ``ratio`` (fraction of the transformer's parameters to remove; 0.3 when neither
    is given) or ``memory`` (weight bytes at ``weight_dtype``). ``alpha=None`` takes the
    family's default.
    """

    ratio: float | None = None
    memory: int | None = None
    weight_dtype: str = "bf16"
    alpha: float | None = None
    r_thres: float = 0.25
    strategy: str = "hierarchical"
    # contribution analysis
    metric: str = "fidelity"
    analysis_prompts: int = 8
    eval_steps: int = 4
    # distillation
    distill: bool = True
    train_prompts: int = 600
    max_train_steps: int = 1000
    max_train_minutes: float | None = None
    learning_rate: float = 1e-4
    train_batch_size: int = 4
    checkpointing_steps: int = 200
    pwp: bool = True
    sgdistill: bool = True
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    # quantisation and evaluation
    quantize: bool = True
    eval_prompts: int = 50
    latency_repeats: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ratio is None and self.memory is None:
            self.ratio = 0.3
        if self.ratio is not None and self.memory is not None:
            raise ConfigError("Give one target: a ratio (e.g. 0.3) or a memory budget in bytes, not both.")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}.")
        if self.memory is not None and self.memory <= 0:
            raise ConfigError(f"memory must be a positive number of bytes, got {self.memory}.")
        if self.weight_dtype not in DTYPES:
            raise ConfigError(f"weight_dtype must be one of {', '.join(DTYPES)}, got {self.weight_dtype!r}.")
        if self.strategy not in strategy_names():
            raise ConfigError(f"strategy must be one of {', '.join(strategy_names())}, got {self.strategy!r}.")
        if not 0 <= self.r_thres <= 1:
            raise ConfigError(f"r_thres must be in [0, 1], got {self.r_thres}.")
        for name in ("analysis_prompts", "eval_steps", "train_prompts", "max_train_steps", "train_batch_size",
                     "eval_prompts", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HPruneConfig:
        data = dict(data)
        if data.pop("format", FORMAT) != FORMAT or data.pop("version", VERSION) != VERSION:
            raise ConfigError(f"Not a {FORMAT} v{VERSION} file; write one with HPruneConfig.save.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown HPruneConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HPruneConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"Cannot read the config {path} ({e}).") from None
        return cls.from_dict(data)


__all__ = ["ConfigError", "HPruneConfig"]
