"""Steps 2-4 of Algorithm 1: from measured contributions to a :class:`~diffusers_hprune.PrunePlan`.

:mod:`.hpp` holds the two-stage HPP selection (``make_plan``); :mod:`.strategies` the
registered strategies (the method and the baselines) with W_pos and Score;
:mod:`.report` writes the table and heat maps of ``hprune report``.
"""

from diffusers_hprune.planning.hpp import DEFAULT_R_THRES, PlanOutcome, make_plan
from diffusers_hprune.planning.report import format_table, write_report
from diffusers_hprune.planning.strategies import (
    RankingInputs,
    Strategy,
    get_strategy,
    position_weight,
    prunability,
    register_strategy,
    strategy_names,
)

__all__ = ["DEFAULT_R_THRES", "PlanOutcome", "RankingInputs", "Strategy", "format_table", "get_strategy", "make_plan",
           "position_weight", "prunability", "register_strategy", "strategy_names", "write_report"]
