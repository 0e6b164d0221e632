"""``hprune compress``: Algorithm 1 end to end (analysis, plan, prune, distil, quantise, evaluate, card).

:mod:`.config` holds :class:`HPruneConfig` (the run's settings, ``hprune_config.json``);
:mod:`.run` chains the stages and makes the run resumable.
"""

from diffusers_hprune.compression.config import ConfigError, HPruneConfig
from diffusers_hprune.compression.run import (
    RUN_CONFIG,
    CompressError,
    compress,
    format_summary,
    holds_something_else,
    split_prompts,
)

__all__ = ["RUN_CONFIG", "CompressError", "ConfigError", "HPruneConfig", "compress", "format_summary",
           "holds_something_else", "split_prompts"]
