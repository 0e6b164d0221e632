"""Speed-first quantisation through torchao, the way Diffusers loads it (``TorchAoConfig``).

NF4 (:mod:`.nf4`) buys memory: bitsandbytes dequantises each weight before its matmul, so it is not faster than
16 bits. torchao's int8 kinds keep int8 weights that its kernels use directly (``torch.compile`` fuses them on a
GPU), for speed as well as half the bf16 bytes:

- ``int8-weight-only`` (``Int8WeightOnlyConfig``): int8 weights, per-row scales, bf16 activations;
- ``int8-dynamic`` (``Int8DynamicActivationInt8WeightConfig``): int8 weights and activations quantised per token at
  run time (an int8 matmul);
- ``fp8-weight-only`` (``Float8WeightOnlyConfig``): float8 e4m3 weights, on GPUs of compute capability 8.9 and newer
  (Ada, Hopper) only.

The transformer is loaded from the folder with ``quantization_config=TorchAoConfig(...)`` in bf16 (torchao's int8
kinds compute in bf16) and saved as safetensors: torchao (from 0.18) flattens its tensors into plain tensors plus JSON
metadata, which it reads back by building only classes on its allow-list, so no pickle is written or read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffusers_hprune.quantization.nf4 import QuantizeError, check_skip_modules
from diffusers_hprune.utils.quant_config import TORCHAO_CLASSES

METHODS = ("nf4", *TORCHAO_CLASSES.values())
"""``hprune quantize --method``: NF4 through bitsandbytes (the default, least memory), or a torchao kind (speed)."""
TORCHAO_METHODS = tuple(TORCHAO_CLASSES.values())
EXTRA = "pip install 'diffusers-hprune[torchao]'"
MIN_TORCHAO = "0.18"
"""torchao writes its int8 kinds as safetensors from 0.18 (0.16 and 0.17 quantise them to classes it cannot flatten)."""


def import_torchao():
    """torchao's quantization module, or a QuantizeError naming the extra (and the version) it needs."""
    try:
        import torchao
        import torchao.quantization as quantization
    except ImportError:
        raise QuantizeError(f"The torchao methods need the torchao package, which is not installed: {EXTRA}, then "
                            "quantise again (or use --method nf4).") from None
    from packaging.version import Version

    if Version(torchao.__version__.split("+")[0]) < Version(MIN_TORCHAO):
        raise QuantizeError(f"torchao {torchao.__version__} cannot save its int8 weights as safetensors (this project "
                            f"writes no pickle); upgrade to {MIN_TORCHAO} or newer: {EXTRA} --upgrade.")
    return quantization


def check_device(method: str, device: torch.device) -> None:
    """fp8 needs a GPU of compute capability 8.9 or newer; refuse it anywhere else, naming the int8 kinds."""
    if method != "fp8-weight-only":
        return
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "this CPU" if device.type != "cuda" else f"this GPU (compute capability {torch.cuda.get_device_capability(device)})"
        raise QuantizeError(f"--method fp8-weight-only needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                            f"{where} has no float8 matmul. Use --method int8-weight-only or int8-dynamic.")


def torchao_config(method: str, skip_modules: Sequence[str]):
    """Diffusers' ``TorchAoConfig`` for ``method`` (:data:`TORCHAO_METHODS`), ``skip_modules`` left in bf16."""
    if method not in TORCHAO_METHODS:
        raise QuantizeError(f"Unknown torchao method {method!r}; choose one of {', '.join(TORCHAO_METHODS)}.")
    from diffusers import TorchAoConfig

    quantization = import_torchao()
    name = next(cls for cls, m in TORCHAO_CLASSES.items() if m == method)
    return TorchAoConfig(getattr(quantization, name)(), modules_to_not_convert=list(skip_modules))


def load_quantized(model_class, folder, method: str, skip_modules: Sequence[str], device: torch.device):
    """``model_class.from_pretrained(folder, ...)`` quantised to ``method`` as it loads, in bf16 on ``device``."""
    check_device(method, device)
    config = torchao_config(method, skip_modules)
    kwargs = {"device_map": str(device)} if device.type == "cuda" else {}
    model = model_class.from_pretrained(folder, quantization_config=config, dtype=torch.bfloat16, **kwargs)
    check_skip_modules(model, skip_modules)
    return model.requires_grad_(False).eval()


__all__ = ["EXTRA", "METHODS", "MIN_TORCHAO", "TORCHAO_METHODS", "check_device", "import_torchao", "load_quantized",
           "torchao_config"]
