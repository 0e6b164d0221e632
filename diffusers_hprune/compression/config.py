"""``HPruneConfig``: the method's hyper-parameters for a whole compression run, with a JSON round trip."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from diffusers_hprune.architecture.sizes import DTYPES
from diffusers_hprune.budget import BudgetOptions
from diffusers_hprune.budget.fit import distill_options
from diffusers_hprune.distillation.settings import DistillationSettings, DistillConfig
from diffusers_hprune.metrics import DEFAULT_METRIC
from diffusers_hprune.planning.strategies import strategy_names
from diffusers_hprune.utils.checks import InputError, check_bool, check_number, read_text_file
from diffusers_hprune.utils.distributed import PRECISIONS
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_write_json

FORMAT = "diffusers-hprune/config"
VERSION = 1


class ConfigError(HPruneError):
    """Hyper-parameters that do not make sense together, or a config file that cannot be read."""


#: Fields that must be true or false (a JSON ``"false"`` is a string, and refused).
_BOOLS = ("distill", "pwp", "sgdistill", "gradient_checkpointing", "use_8bit_adam", "teacher_4bit", "quantize",
          "vae_tiling")
#: Integer fields and their least value (0: off).
_INTS = {"analysis_prompts": 1, "eval_steps": 1, "train_prompts": 1, "max_train_steps": 1, "train_batch_size": 1,
         "eval_prompts": 1, "latency_repeats": 1, "checkpointing_steps": 0, "lora_rank": 0, "seed": 0,
         "eval_batch_size": 1}


def _number(name: str, value, *, kind: type = float, what: str | None = None, **bounds) -> None:
    """``check_number`` for an HPruneConfig field: a ConfigError that says where to set it."""
    try:
        check_number(name, value, kind=kind, error=ConfigError, **bounds)
    except ConfigError as e:
        detail = f"{name} must be {what}, got {value!r}." if what else str(e)
        raise ConfigError(f"{detail} Set it in the --config file or with --{name.replace('_', '-')}.") from None


#: The settings that change each stage's result, as the stage keys them: field -> its name in the stage's key (the
#: names the keys have always had, so the folders of earlier runs keep theirs). The distillation stage keys the
#: fields it shares with DistillConfig through ``distill_config().result_settings()``, and ``train_prompts``
#: through the prompts' digest.
ANALYSIS_KEY = {"metric": "metric", "analysis_prompts": "n", "eval_steps": "eval_steps", "seed": "seed",
                "vae_tiling": "vae_tiling"}
PLAN_KEY = {"ratio": "ratio", "memory": "memory", "weight_dtype": "weight_dtype", "alpha": "alpha",
            "r_thres": "r_thres", "strategy": "strategy"}
EVALUATION_KEY = {"eval_prompts": "n", "seed": "seed", "vae_tiling": "vae_tiling"}
#: Keyed settings a key names only when they are on: a key written before they existed is the same key.
NAMED_WHEN_ON = ("vae_tiling",)
#: Settings that choose whether a stage runs (a stage that runs is keyed as above).
STAGE_CHOICES = ("distill", "quantize")
#: Settings that key no stage: how often a measurement repeats (the evaluation keeps the latency it measured first).
UNKEYED = ("latency_repeats", "eval_batch_size")


@dataclass
class HPruneConfig(DistillationSettings):
    """Every setting of ``hprune compress`` (analysis, HPP, distillation, quantisation, evaluation).

    One target: ``ratio`` (fraction of the transformer's parameters to remove; 0.3 when neither
    is given) or ``memory`` (weight bytes at ``weight_dtype``). ``alpha=None`` takes the
    family's default.
    """

    ratio: float | None = None
    memory: int | None = None
    weight_dtype: str = "bf16"
    alpha: float | None = None
    strategy: str = "hierarchical"
    # contribution analysis
    metric: str = DEFAULT_METRIC
    analysis_prompts: int = 8
    eval_steps: int = 4
    # distillation
    distill: bool = True
    train_prompts: int = 600
    # (and DistillationSettings', shared with `hprune distill`: max_train_steps, max_train_minutes, learning_rate,
    # train_batch_size, seed, pwp, sgdistill, r_thres, gradient_checkpointing, lora_rank, use_8bit_adam, teacher_4bit)
    checkpointing_steps: int = 200  # compress checkpoints its distillation every 200 steps (`hprune distill`: 500)
    mixed_precision: str = "no"  # a compress run has no launch config to take it from (DistillConfig's None)
    # quantisation and evaluation
    quantize: bool = True
    eval_prompts: int = 50
    eval_batch_size: int = 8  # prompts per pipeline call (evaluate_pipelines' default)
    latency_repeats: int = 10
    vae_tiling: bool = False  # the analysis and the evaluation decode each image in tiles (for FLUX.1 on 24 GB)

    def __post_init__(self) -> None:
        if self.ratio is None and self.memory is None:
            self.ratio = 0.3
        if self.ratio is not None and self.memory is not None:
            raise ConfigError("Give one target: a ratio (e.g. 0.3) or a memory budget in bytes, not both.")
        if self.ratio is not None:
            _number("ratio", self.ratio, minimum=0, exclusive_minimum=True)
            if not self.ratio < 1:
                raise ConfigError(f"ratio must be in (0, 1), got {self.ratio}; e.g. 0.3 removes 30% of the parameters.")
        if self.memory is not None:
            _number("memory", self.memory, kind=int, minimum=1,
                    what="a positive whole number of bytes (an integer, e.g. 4000000000)")
        for name in _BOOLS:
            try:
                check_bool(name, getattr(self, name), error=ConfigError)
            except ConfigError as e:
                raise ConfigError(f"{e} In a --config file write true or false without quotes.") from None
        for name, minimum in _INTS.items():
            _number(name, getattr(self, name), kind=int, minimum=minimum)
        for name, choices in (("weight_dtype", DTYPES), ("strategy", strategy_names()),
                              ("mixed_precision", PRECISIONS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}.")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"metric must be a metric's name (e.g. {DEFAULT_METRIC}), got {self.metric!r}.")
        if self.alpha is not None:
            _number("alpha", self.alpha)
        _number("r_thres", self.r_thres, minimum=0, maximum=1)
        _number("learning_rate", self.learning_rate, minimum=0, exclusive_minimum=True)
        if self.max_train_minutes is not None:
            _number("max_train_minutes", self.max_train_minutes, minimum=0, exclusive_minimum=True)

    def distill_config(self, **options: Any) -> DistillConfig:
        """The distillation this run's settings describe: every :class:`DistillConfig` option that this config also
        has (the same name means the same setting), then ``options`` (the paths: teacher, plan, analysis, output_dir,
        prompts, cache_dir; and what the run decides itself)."""
        own = {f.name for f in fields(self)}
        shared = {f.name: getattr(self, f.name) for f in fields(DistillConfig) if f.name in own}
        return DistillConfig(**{**shared, **options})

    def _key(self, names: dict[str, str]) -> dict[str, Any]:
        return {key: getattr(self, name) for name, key in names.items()
                if name not in NAMED_WHEN_ON or getattr(self, name)}

    def analysis_settings(self) -> dict[str, Any]:
        """What the analysis stage's result depends on among these settings (:data:`ANALYSIS_KEY`)."""
        return self._key(ANALYSIS_KEY)

    def plan_settings(self) -> dict[str, Any]:
        """What the plan stage's result depends on among these settings (:data:`PLAN_KEY`)."""
        return {key: getattr(self, name) for name, key in PLAN_KEY.items()}

    def evaluation_settings(self) -> dict[str, Any]:
        """What the evaluation stage's result depends on among these settings (:data:`EVALUATION_KEY`)."""
        return self._key(EVALUATION_KEY)

    def analysis_budget(self) -> BudgetOptions:
        """What ``hprune budget`` needs to know of this run's analysis."""
        return BudgetOptions(analysis_prompts=self.analysis_prompts, eval_steps=self.eval_steps,
                             vae_tiling=self.vae_tiling)

    def evaluation_budget(self) -> BudgetOptions:
        """What ``hprune budget`` needs to know of this run's evaluation: the student it compares (NF4 unless
        quantisation is off), the drawing batch and the VAE's tiles."""
        return BudgetOptions(quantize=self.quantize, eval_batch_size=self.eval_batch_size, vae_tiling=self.vae_tiling)

    def distillation_budget(self, prompts: list[str] | None = None) -> BudgetOptions:
        """What ``hprune budget`` needs to know of this run's distillation (:meth:`distill_config`, as
        ``hprune distill`` would be given it), drawing one sample per prompt given, else ``train_prompts``."""
        samples = len(prompts) if prompts else self.train_prompts
        return distill_options(self.distill_config(teacher="", plan="", output_dir="", max_samples=samples))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HPruneConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"An HPruneConfig must be a JSON object of settings, got {type(data).__name__}; write "
                              "one with HPruneConfig.save.")
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
            data = json.loads(read_text_file(path, "config"))
        except InputError as e:
            raise ConfigError(str(e)) from None
        except ValueError as e:
            raise ConfigError(f"The config {path} is not valid JSON ({e}); fix it, or write one with "
                              "HPruneConfig.save.") from None
        return cls.from_dict(data)


__all__ = ["ANALYSIS_KEY", "EVALUATION_KEY", "PLAN_KEY", "STAGE_CHOICES", "UNKEYED", "ConfigError", "HPruneConfig"]
