"""Teacher/student evaluation: image metrics, PSNR/SSIM against the original, and measured cost per step.

:mod:`.compare` runs both pipelines on the same prompts and seeds; :mod:`.measure` holds
the measurements (stored bytes, logical parameters, step latency and memory). The metric
registry is shared with the analysis and lives in :mod:`diffusers_hprune.metrics`.
"""

from diffusers_hprune.evaluation.compare import (
    FIDELITY,
    EvaluationError,
    evaluate_pipelines,
    load_for_evaluation,
    overall_score,
    psnr,
    ssim,
)

__all__ = ["FIDELITY", "EvaluationError", "evaluate_pipelines", "load_for_evaluation", "overall_score", "psnr", "ssim"]
