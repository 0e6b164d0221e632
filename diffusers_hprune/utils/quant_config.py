"""What a transformer config's ``quantization_config`` says, for the code that treats quantised models apart: the
project's method name (``nf4`` through bitsandbytes, ``int8-weight-only`` / ``int8-dynamic`` / ``fp8-weight-only``
through torchao), and whether bitsandbytes placed the weights (they then stay on their device)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: torchao's config class (the ``_type`` Diffusers records in ``quant_type``) -> the project's method name.
TORCHAO_CLASSES = {
    "Int8WeightOnlyConfig": "int8-weight-only",
    "Int8DynamicActivationInt8WeightConfig": "int8-dynamic",
    "Float8WeightOnlyConfig": "fp8-weight-only",
}


def _as_dict(quantization: Any) -> Mapping[str, Any] | None:
    if quantization is None:
        return None
    if hasattr(quantization, "to_dict"):
        quantization = quantization.to_dict()
    return quantization if isinstance(quantization, Mapping) else None


def quantization_method(config: Mapping[str, Any] | Any) -> str | None:
    """The project's name for how the transformer of ``config`` (a config mapping, or a model's ``config``) is
    quantised: ``"nf4"``, a :data:`TORCHAO_CLASSES` name, ``"torchao"`` / ``"bitsandbytes"`` for another kind of
    theirs, the ``quant_method`` for another library, ``None`` when it is not quantised."""
    quantization = config.get("quantization_config") if isinstance(config, Mapping) else getattr(
        config, "quantization_config", None)
    quantization = _as_dict(quantization)
    if not quantization:
        return None
    method = quantization.get("quant_method", "")
    method = str(getattr(method, "value", method))  # a loaded model's config holds Diffusers' QuantizationMethod enum
    if method == "bitsandbytes":
        return "nf4" if quantization.get("load_in_4bit") and quantization.get("bnb_4bit_quant_type") == "nf4" \
            else "bitsandbytes"
    if method == "torchao":
        quant_type = quantization.get("quant_type")
        if isinstance(quant_type, Mapping):  # as saved: {"default": {"_type": "Int8WeightOnlyConfig", ...}}
            entry = quant_type.get("default", quant_type)
            name = entry.get("_type") if isinstance(entry, Mapping) else None
        else:  # in memory: the config object itself
            name = type(quant_type).__name__
        return TORCHAO_CLASSES.get(str(name), "torchao")
    return method or "unknown"


def is_bitsandbytes(config: Mapping[str, Any] | Any) -> bool:
    """True for a bitsandbytes-quantised transformer: its layers stay where bitsandbytes put them."""
    method = quantization_method(config)
    return method in ("nf4", "bitsandbytes")


__all__ = ["TORCHAO_CLASSES", "is_bitsandbytes", "quantization_method"]
