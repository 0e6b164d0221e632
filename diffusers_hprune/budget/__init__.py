"""``hprune budget``: predicted peak accelerator memory and host RAM of every stage, before loading any weight.

:func:`predict` models each stage as the code runs it (:mod:`.stages`), with the activations
traced on the meta device through the real modules (:mod:`.traces`) and the components beside
the transformer read from the pipeline folder or taken from the published models
(:mod:`.components`). ``benchmarks/rehearsal.py`` checks the predictions against measured peaks.
"""

from diffusers_hprune.budget.stages import (
    CARDS_GIB,
    Budget,
    BudgetError,
    BudgetOptions,
    StageBudget,
    optimizer_state_bytes,
    predict,
)

__all__ = ["CARDS_GIB", "Budget", "BudgetError", "BudgetOptions", "StageBudget", "optimizer_state_bytes", "predict"]
