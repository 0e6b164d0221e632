"""4-bit dequantisation on the CPU is correct for every weight shape, on every processor.

bitsandbytes' native CPU kernel is wrong on AVX-512 processors when a weight's last dimension
is not a multiple of the 64-element block (the toys are 96 wide). These tests compare what the
project's quantisation and loading paths compute against a dequantisation written here in
numpy from the stored codes, so they fail on such a processor if the fix is lost, and they
also replace bitsandbytes' kernel by a deliberately faulty one to show the fix supersedes it
on any processor.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_hprune import toy
from diffusers_hprune.quantization import quantize
from diffusers_hprune.quantization.folder import quantize_pipeline
from diffusers_hprune.utils.nf4_cpu import dequantize_4bit, install_cpu_dequantize, keep_cpu_layout

SHAPES = [(864, 96), (96, 864), (10, 100), (256, 256), (7,)]


def reference_dequantize(packed: torch.Tensor, state) -> np.ndarray:
    """NF4 / FP4 weights from their stored codes, in numpy: codes in storage order, high nibble first,
    one scale per ``blocksize`` codes; a nested (double-quantised) scale is code2[q] * absmax2[i // 256] + offset."""
    code = state.code.double().numpy()
    data = packed.reshape(-1).view(torch.uint8).numpy()
    n = int(np.prod(state.shape))
    idx = np.empty(data.size * 2, dtype=np.int64)
    idx[0::2], idx[1::2] = data >> 4, data & 0xF
    values = code[idx[:n]]
    if state.nested:
        s2 = state.state2
        q = state.absmax.numpy().astype(np.int64)
        absmax = s2.code.double().numpy()[q] * np.repeat(s2.absmax.double().numpy(), s2.blocksize)[: q.size]
        absmax = absmax + float(state.offset)
    else:
        absmax = state.absmax.double().numpy()
    return (values * absmax[np.arange(n) // state.blocksize]).reshape(state.shape)


def _assert_matches_reference(weight: torch.Tensor, packed, state, what: str) -> None:
    ref = reference_dequantize(packed, state)
    got = weight.double().numpy()
    # float32 rounding of code * scale (and of the nested scale) is all that may differ
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max(), what


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_dequantisation_matches_an_independent_one(shape, nested):
    import bitsandbytes.functional as F

    install_cpu_dequantize()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    out = F.dequantize_4bit(packed, state)  # what a CPU Linear4bit uses, through the operator's CPU kernel
    _assert_matches_reference(out, packed, state, str(shape))
    assert float((out - w).norm() / w.norm()) < 0.1  # NF4's rounding (about 9 % on Gaussian weights), no more
    if not nested:  # computed in float32, rounded once to the asked dtype
        bf16 = dequantize_4bit(packed, state.absmax, 64, "nf4", shape, torch.bfloat16)
        assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, out.to(torch.bfloat16))


def test_agrees_with_bitsandbytes_generic_path():
    """Bit for bit what bitsandbytes' own processor-independent path computes."""
    generic = pytest.importorskip("bitsandbytes.backends.default.ops")._dequantize_4bit_compute
    import bitsandbytes.functional as F

    for shape in SHAPES:
        w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ours = dequantize_4bit(packed, state.absmax, 64, "nf4", shape, torch.float32)
        theirs = generic(packed.view(torch.uint8).reshape(-1), state.absmax, state.code, 64, shape, torch.float32)
        assert torch.equal(ours, theirs), shape


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_quantized_toy_layers_hold_the_stored_weights(family):
    """Every 4-bit layer of a quantised 96-wide toy dequantises to what its codes say, and computes with it."""
    import bitsandbytes as bnb

    q = quantize(copy.deepcopy(toy.load_pipeline(family).transformer))
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(m.in_features % 64 for _, m in layers)  # the shapes the native AVX-512 kernel gets wrong
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    for name, layer in layers:
        state = layer.weight.quant_state
        w = bnb.functional.dequantize_4bit(layer.weight.data, state)
        _assert_matches_reference(w, layer.weight.data, state, name)
        if layer.in_features == 96:
            ref = torch.from_numpy(reference_dequantize(layer.weight.data, state)).float()
            with torch.no_grad():
                out = layer(x)
            torch.testing.assert_close(out, torch.nn.functional.linear(x, ref, layer.bias), rtol=1e-5, atol=1e-5)


FAULTY_KERNEL = """
import torch, bitsandbytes
# Stand-in for the native AVX-512 kernel: reads blocks row by row, as if every row started a block.
def faulty(A, absmax, blocksize, quant_type, shape, dtype):
    code = bitsandbytes.functional.get_4bit_type(quant_type, device="cpu")
    a = A.reshape(-1).view(torch.uint8)
    idx = torch.stack([a >> 4, a & 15], 1).reshape(-1).long()
    rows, cols = (1, shape[0]) if len(shape) == 1 else (int(torch.tensor(shape[:-1]).prod()), shape[-1])
    per_row = -(-cols // blocksize)
    col = torch.arange(cols)
    scale = absmax.float()[(torch.arange(rows)[:, None] * per_row + col // blocksize).clamp(max=absmax.numel() - 1)]
    return (code[idx[: rows * cols]].view(rows, cols) * scale).view(*shape).to(dtype)
lib = torch.library.Library("bitsandbytes", "IMPL")
lib.impl("dequantize_4bit", faulty, "CPU")
"""


@pytest.mark.slow  # end-to-end: runs in CI's second step (--runslow)
def test_the_loading_path_supersedes_a_faulty_cpu_kernel(tmp_path):
    """A fresh process whose bitsandbytes CPU kernel is wrong for 96-wide weights still loads correct NF4 layers."""
    q = quantize(copy.deepcopy(toy.load_pipeline("sd3").transformer))
    q.save_pretrained(tmp_path / "q")
    code = FAULTY_KERNEL + (
        "import bitsandbytes.functional as F\n"
        "w = torch.randn(864, 96)\n"
        "p, s = F.quantize_4bit(w, blocksize=64, quant_type='nf4')\n"
        "faulty_error = float((F.dequantize_4bit(p, s) - w).norm() / w.norm())\n"
        "from diffusers_hprune import HierarchicalPrunedSD3Transformer2DModel as C\n"
        f"m = C.from_pretrained({str(tmp_path / 'q')!r})\n"
        "layer = m.transformer_blocks[0].norm1.linear\n"
        "fixed_error = float((F.dequantize_4bit(p, s) - w).norm() / w.norm())\n"
        "torch.save({'faulty': faulty_error, 'fixed': fixed_error,\n"
        "            'weight': F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)},\n"
        f"           {str(tmp_path / 'out.pt')!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["faulty"] > 0.2  # the stand-in gives the kind of error seen on AVX-512 (25 %)
    assert out["fixed"] < 0.1
    layer = q.transformer_blocks[0].norm1.linear  # the same codes as the file the process loaded
    assert layer.in_features == 96
    _assert_matches_reference(out["weight"], layer.weight.data, layer.weight.quant_state, "loaded norm1.linear")


def test_avx512_bf16_repacking_is_kept_off_every_layer(monkeypatch):
    """bitsandbytes' AVX512-BF16 path re-packs a layer on its first CPU call: 96-wide layers would fail there,
    and on the others the outputs would change once the model is saved (tests/test_quantize.py's round trip)."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on a processor that has it
    q = quantize(copy.deepcopy(toy.load_pipeline("sd3").transformer))
    layers = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    unpackable = [m for m in layers if m.in_features % 64 or m.out_features % 32]
    packable = [m for m in layers if m not in unpackable]
    assert unpackable and packable
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    layer = unpackable[0]
    with pytest.raises((RuntimeError, AssertionError)):  # what bitsandbytes would do on the first call
        _convert_weight_packed_for_cpu(layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state))
    for m in layers:
        m.support_avx512bf16_for_cpu = True
    assert keep_cpu_layout(q) == len(layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_cpu_dequantize_bytes_traced_on_meta_equal_a_real_cpu_dequantisation():
    """The budget's CPU 4-bit working set: the installed computation's peak, meta trace == real run."""
    import math

    import bitsandbytes.functional as F

    from diffusers_hprune.utils.live_memory import LiveTensorBytes
    from diffusers_hprune.utils.nf4_cpu import cpu_dequantize, cpu_dequantize_bytes, install_cpu_dequantize

    install_cpu_dequantize()
    shape = (96, 160)
    packed, state = F.quantize_4bit(torch.randn(shape), blocksize=64, quant_type="nf4")
    counter = LiveTensorBytes([packed, state.absmax])
    with torch.compiler.set_stance("force_eager"), counter:  # the computation itself: its temporaries are seen
        out = cpu_dequantize(packed, state.absmax, 64, "nf4", shape, torch.float32)
    assert torch.equal(out, torch.ops.bitsandbytes.dequantize_4bit(packed, state.absmax, 64, "nf4", list(shape),
                                                                    torch.float32))  # what the operator computes
    assert cpu_dequantize_bytes(shape) == counter.peak > 4 * math.prod(shape)  # more than its output


def test_loading_an_nf4_folder_fetches_no_hub_kernel_and_says_nothing_of_it(tmp_path):
    """Issue 32: bitsandbytes 0.50 downloads kernels-community code at import on AVX512-BF16 processors and logs
    "Failed to load CPU gemm_4bit_forward from kernels-community" to every user of a CPU NF4 model. The project's
    import of it blocks that (the layers it would serve are kept off that path: keep_cpu_layout)."""
    folder = quantize_pipeline(toy.model_path("sd3"), tmp_path / "nf4")
    code = ("import sys, diffusers_hprune\nfrom diffusers import DiffusionPipeline\n"
            "pipe = DiffusionPipeline.from_pretrained(sys.argv[1])\n"
            "print('OK', type(pipe.transformer).__name__)")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK HierarchicalPrunedSD3Transformer2DModel" in result.stdout
    assert "kernels-community" not in result.stderr and "gemm_4bit" not in result.stderr, result.stderr[-2000:]
