"""Issue 35: what the single-file and GGUF exports keep of a pruned toy's images, per GGUF kind.

    python benchmarks/file_exports.py [--n 100] [--no-write]

For each shipped toy: the HPP plan at 20 % from a synthetic analysis (below r_thres, so whole blocks only: what
these layouts carry), the pruned model in fp32 as the reference, then every kind ``hprune export --format gguf``
writes. Per kind: the file's size, the PSNR of its images against the reference's (``--n`` held-out prompts, one
image each, seed = index) and their ShapeEval.

How the quantised weights get into the model:

* SD3 toy: the file read back by Diffusers (``SD3Transformer2DModel.from_single_file`` with
  ``GGUFQuantizationConfig``, float32 compute), the rest of the pipeline from the stock export; and, beside it, the
  same weights quantised and dequantised in place with the ``gguf`` package (the "in place" column). The two agree
  where both exist, which is what licenses the second method for the FLUX toy.
* FLUX toy: Diffusers' FLUX converter splits a single block's fused projection at FLUX.1's width (3072), so it
  cannot read the toy (hidden size 32); the weights are quantised and dequantised in place. That is the same
  arithmetic as the file: the original layout fuses projections by stacking rows, and GGUF's blocks run along a
  row, so each row quantises the same fused or not; which tensors stay 32-bit is decided per row length and name
  in both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _report import markdown_table, update_section  # noqa: E402

from diffusers_hprune import prune_pipeline, toy  # noqa: E402
from diffusers_hprune.analysis import synthetic_report  # noqa: E402
from diffusers_hprune.architecture import get_family  # noqa: E402
from diffusers_hprune.architecture.inventory import inspect_transformer  # noqa: E402
from diffusers_hprune.hub import export_folder  # noqa: E402
from diffusers_hprune.hub.gguf_file import GGUF_KINDS, export_gguf, tensor_kind  # noqa: E402
from diffusers_hprune.hub.single_file import export_single_file  # noqa: E402
from diffusers_hprune.planning import make_plan  # noqa: E402


def psnr(images, references) -> float:
    a = np.stack([toy.to_array(im) for im in images]).astype(np.float64)
    b = np.stack([toy.to_array(im) for im in references]).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def in_place(pipe, kind: str):
    """``pipe`` with every transformer weight the GGUF export would quantise to ``kind`` quantised and dequantised
    by the gguf package (a copy). What stays 32-bit, by the Diffusers names: tensors of fewer than two dimensions,
    rows that do not split into the kind's blocks, and the family's input and output modules (the embedders and the
    final layer: the original layout's ``high_precision`` prefixes, under their Diffusers names)."""
    import copy

    import gguf

    family = get_family(pipe.transformer)
    high = tuple(m + "." for m in family.input_modules + family.output_modules)
    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    out = copy.deepcopy(pipe)
    with torch.no_grad():
        for key, param in out.transformer.state_dict().items():
            if tensor_kind(key, param, kind, high, block) == "F32":
                continue
            data = param.float().numpy()
            param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return out


def read_back(file: Path, stock: Path):
    import diffusers
    from diffusers import DiffusionPipeline, GGUFQuantizationConfig

    cls = getattr(diffusers, get_family("sd3").base_class_name)
    quantised = {"quantization_config": GGUFQuantizationConfig(compute_dtype=torch.float32)} if file.suffix == ".gguf" else {}
    transformer = cls.from_single_file(str(file), config=str(stock), subfolder="transformer", torch_dtype=torch.float32,
                                       **quantised)
    pipe = DiffusionPipeline.from_pretrained(stock, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_toy(family: str, n: int, work: Path) -> list[list]:
    from diffusers_hprune.toy.shapeeval import shapeeval

    pipe = toy.load_pipeline(family)
    config = dict(pipe.transformer.config)
    plan = make_plan(synthetic_report(config).contributions(), inspect_transformer(config), ratio=0.2).plan
    assert not plan.removed_components, plan.describe()
    pruned = prune_pipeline(pipe, plan)
    folder = work / family / "pruned"
    pruned.save_pretrained(folder)
    stock = export_folder(folder, work / family / "stock")
    prompts = toy.prompts(split="heldout", n=n)
    reference = toy.generate(pruned, prompts)
    single = export_single_file(folder, work / family / "model.safetensors")
    read = f"{psnr(toy.generate(read_back(single, stock), prompts), reference):.1f}" if family == "sd3" else "-"
    rows = [[family, "single-file (fp32)", f"{single.stat().st_size / 2**20:.2f}", read, "-",
             f"{shapeeval(reference, prompts)['overall']:.3f}"]]
    for kind in GGUF_KINDS:
        file, _ = export_gguf(folder, work / family / f"model-{kind}.gguf", quant=kind, progress=False)
        placed = toy.generate(in_place(pruned, kind), prompts)
        read = f"{psnr(toy.generate(read_back(file, stock), prompts), reference):.1f}" if family == "sd3" else "-"
        rows.append([family, f"GGUF {kind}", f"{file.stat().st_size / 2**20:.2f}", read,
                     f"{psnr(placed, reference):.1f}", f"{shapeeval(placed, prompts)['overall']:.3f}"])
        print(rows[-1], flush=True)
    return [[*r[:2], plan.describe() if i == 0 else "", *r[2:]] for i, r in enumerate(rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per model")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        rows = run_toy("sd3", args.n, Path(work)) + run_toy("flux", args.n, Path(work))
    table = markdown_table(["toy", "file", "plan", "MiB", "PSNR dB (Diffusers read-back)", "PSNR dB (in place)",
                            "ShapeEval"], rows)
    body = (f"HPP 20 % plan of each shipped toy (synthetic analysis; whole blocks only), the pruned model in fp32 as "
            f"the reference; {args.n} held-out prompts, one image each, seed = index. PSNR of each file's images "
            "against the reference's. Diffusers read-back: `SD3Transformer2DModel.from_single_file(file, "
            "quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=stock export)`; in place: "
            "the same weights quantised and dequantised by the gguf package inside the model (the FLUX toy's only "
            "method: Diffusers' FLUX converter reads FLUX.1's width only). Biases, norms, embedders and the final "
            "layer stay 32-bit in every kind. ShapeEval of the single-file row is the reference's.\n\n" + table)
    print(body)
    if not args.no_write:
        update_section("file-exports", "Single-file and GGUF exports of the toys (issue 35)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
