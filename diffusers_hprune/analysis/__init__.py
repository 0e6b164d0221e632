"""Step 1 of Algorithm 1: contribution analysis, dP(i, c) for every block i and component c.

``analyze`` (:mod:`.runner`) measures and writes a :class:`~diffusers_hprune.contributions.ContributionReport`
(``analysis.json``); :mod:`.ablation` holds the cached replay that makes it cheap;
``synthetic_report`` (:mod:`.synthetic`) makes a report from a config alone, for planning
models whose weights are not here.
"""

from diffusers_hprune.analysis.runner import DEFAULT_PROMPTS, METHODS, analyze, eval_step_indices
from diffusers_hprune.analysis.synthetic import synthetic_report
from diffusers_hprune.contributions import AnalysisError, ContributionReport, component_keys

__all__ = ["DEFAULT_PROMPTS", "METHODS", "AnalysisError", "ContributionReport", "analyze", "component_keys",
           "eval_step_indices", "synthetic_report"]
