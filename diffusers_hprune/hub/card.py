"""Model cards for compressed pipelines, rendered with ``huggingface_hub.ModelCard`` from our template.

``write_model_card(folder, base_model=...)`` reads what the folder holds (the prune plan and
any ``quantization_config`` in ``transformer/config.json``, ``distill_summary.json`` when the
folder came from ``hprune distill``) and, when given, a ``hprune evaluate`` result and its
sample grid, and writes ``README.md`` (YAML metadata + text) into the folder, atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from diffusers_hprune.architecture import get_family
from diffusers_hprune.evaluation.compare import overall_score
from diffusers_hprune.hub.folders import PLAN_FILE, FolderError, default_format, folder_format, folder_plan
from diffusers_hprune.hub.remote_code import MODULE_NAME
from diffusers_hprune.pipelines.pruned import stock_pipeline_name
from diffusers_hprune.utils.errors import HPruneError
from diffusers_hprune.utils.fileio import atomic_path, atomic_write_text
from diffusers_hprune.utils.quant_config import quantization_method

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
USAGE = Path(__file__).parent / "templates" / "usage.md"
USAGE_HEADING = "## How to use"
GRID_NAME = "samples.png"


class CardError(HPruneError):
    """A folder or an evaluation result the card cannot describe."""


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CardError(f"{path} is not valid JSON ({e}); write it again with the command that made it.") from None


def _plan_table(plan) -> str:
    rows = ["| block | removed |", "| --- | --- |"]
    for index in plan.removed_blocks:
        rows.append(f"| {index} | the whole block |")
    for index, components in sorted(plan.removed_components.items()):
        rows.append(f"| {index} | {', '.join(components)} |")
    return "\n".join(rows) if len(rows) > 2 else "Nothing was removed."


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


#: How the card names the models of an evaluation (``hprune compress`` adds the student before quantisation).
MODEL_NAMES = {"teacher": "base model", "unquantized": "this model before quantisation", "student": "this model"}


def _speed_table(models: dict, evaluation: dict) -> str:
    """Every evaluated model's step latency beside its FLOP bound (the latency share the FLOP reduction alone would
    give), and where it was measured."""
    base = models["teacher"]
    if not all("latency_s" in m for m in models.values()):
        return ""
    rows = ["| model | weights | latency of one step | of the base model | FLOP bound |", "| --- | --- | --- | --- | --- |"]
    for name, m in models.items():
        share = m["latency_s"]["median"] / base["latency_s"]["median"]
        bound = (f"{m['step_flops'] / base['step_flops']:.1%}" if m.get("step_flops") and base.get("step_flops")
                 else "-")
        rows.append(f"| {MODEL_NAMES.get(name, name)} | {m.get('weights', '-')} | {m['latency_s']['median'] * 1e3:.1f} ms "
                    f"| {share:.1%} | {bound} |")
    device = evaluation.get("device", "a device the evaluation did not record")
    return ("\n\n" + "\n".join(rows) + f"\n\nMeasured on {device}. The FLOP bound is the latency share the removed "
            "FLOPs alone would give (FLOPs of one step, attention included); a quantised kind computes the FLOPs of "
            "its 16-bit self, so NF4, which dequantises every weight before its matmul, is slower than its bound and "
            "int8 kinds can be faster where int8 matmuls are.")


def _tables(evaluation: dict | None) -> tuple[str, str]:
    if not evaluation:
        return ("Not measured (run `hprune evaluate BASE THIS --out metrics.json` and pass it to the card).",) * 2
    models = evaluation.get("models", {})
    if "teacher" not in models or "student" not in models:
        raise CardError("The evaluation result must compare a teacher and a student (`hprune evaluate TEACHER "
                        "STUDENT --out metrics.json`).")
    t, s = models["teacher"], models["student"]
    cost = ["| | base model | this model | ratio |", "| --- | --- | --- | --- |"]
    if "params" in s:
        cost.append(f"| transformer parameters | {t['params']:,} | {s['params']:,} | {s['params'] / t['params']:.1%} |")
        cost.append(f"| transformer weights | {_fmt_bytes(t['weight_bytes'])} | {_fmt_bytes(s['weight_bytes'])} | "
                    f"{s['weight_bytes'] / t['weight_bytes']:.1%} |")
        cost.append(f"| peak memory of one step | {_fmt_bytes(t['step_peak_bytes'])} | "
                    f"{_fmt_bytes(s['step_peak_bytes'])} | {s['step_peak_bytes'] / t['step_peak_bytes']:.1%} |")
        cost.append(f"| latency of one step (median) | {t['latency_s']['median'] * 1e3:.1f} ms | "
                    f"{s['latency_s']['median'] * 1e3:.1f} ms | {s['latency_s']['median'] / t['latency_s']['median']:.1%} |")
        cost_text = "\n".join(cost) + f"\n\nMemory: {s.get('memory_method', '')}." + _speed_table(models, evaluation)
    else:
        cost_text = "Not measured."
    quality = ["| metric | base model | this model | ratio |", "| --- | --- | --- | --- |"]
    for metric, value in s.get("metrics", {}).items():
        sv, tv = overall_score(value), overall_score(t["metrics"].get(metric))
        quality.append(f"| {metric} | {tv:.4g} | {sv:.4g} | {sv / tv:.1%} |" if tv else f"| {metric} | - | {sv:.4g} | |")
    if "fidelity" in s:
        f = s["fidelity"]
        ssim = f" / SSIM {f['ssim']:.3f}" if f.get("ssim") is not None else ""
        quality.append(f"| fidelity to the base model (PSNR{' / SSIM' if ssim else ''}) | - | "
                       f"{f['psnr_db']:.2f} dB{ssim} | |")
    gen = evaluation.get("generation", {})
    quality_text = "\n".join(quality) + (f"\n\n{len(evaluation.get('prompts', []))} prompts, seeds from "
                                         f"{evaluation.get('seed', 0)}, generation settings `{json.dumps(gen)}`.")
    return cost_text, quality_text


def render_model_card(folder: str | os.PathLike, *, base_model: str, repo_id: str | None = None,
                      evaluation: dict | None = None, grid: str | None = None, commands: list[str] | tuple = (),
                      license: str | None = None, tags: list[str] | tuple = (), model_name: str | None = None):
    """The ``huggingface_hub.ModelCard`` of the pipeline folder ``folder`` (not written).

    ``base_model`` goes into the metadata (with ``base_model_relation``) and becomes a link
    when it is a Hub repo id; a local folder or a toy name is named in the text only.
    ``model_name``: the title (default: the last part of ``repo_id``, else the folder name).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    if not (folder / "model_index.json").is_file() or not (folder / "transformer" / "config.json").is_file():
        raise CardError(f"{folder} is not a pipeline folder with a transformer (no model_index.json or "
                        "transformer/config.json); give the folder `hprune distill`, `hprune quantize` or "
                        "`save_pretrained` wrote.")
    try:
        config, plan = folder_plan(folder)
    except FolderError as e:
        raise CardError(str(e)) from None
    method = quantization_method(config)
    quantized = method is not None
    distilled = (folder / "distill_summary.json").is_file()
    card_tags = ["diffusers", "text-to-image", "hierarchicalprune", "diffusers-hprune"]
    if not plan.is_empty:
        card_tags.append("pruned")
    if distilled:
        card_tags.append("distillation")
    if method == "nf4":
        card_tags += ["4-bit", "nf4", "bitsandbytes"]
    elif method is not None:
        card_tags += [t for t in ("8-bit" if method.startswith("int8") else "", method, "torchao") if t]
    card_tags += [t for t in tags if t not in card_tags]
    on_hub = "/" in base_model and not Path(base_model).exists()
    # Hub convention: "quantized" is the base model's weights, only quantised; pruning (and distilling) changes them.
    only_quantized = quantized and plan.is_empty and not distilled
    relation = {"base_model": base_model, "base_model_relation": "quantized" if only_quantized else "finetune"}
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=card_tags,
                         license=license or "other", **(relation if on_hub else {}))
    cost, quality = _tables(evaluation)
    how = "\n".join(f"{k + 1}. `{c}`" for k, c in enumerate(commands)) or "See the diffusers-hprune documentation."
    training = _distillation_line(_read_json(folder / "distill_summary.json")) if distilled else ""
    if training:
        how = f"{how}\n\n{training}"
    repo = repo_id or folder.name
    base_url = f"https://huggingface.co/{base_model}" if on_hub else ""
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=model_name or repo.split("/")[-1], base_model=base_model,
        base_model_url=base_url, repo_id=repo, distilled=distilled, quantized=quantized, method=method,
        plan_words=plan.describe() if not plan.is_empty else "Nothing (an unpruned model).",
        plan_table=_plan_table(plan) if not plan.is_empty else "", pruned=not plan.is_empty,
        cost_table=cost, quality_table=quality, grid=grid, how_made=how, usage=usage_section(folder, repo_id),
    )


def _distillation_line(summary: dict | None) -> str:
    """The distillation's steps, precision and processes, as ``distill_summary.json`` recorded them."""
    if not isinstance(summary, dict) or "steps" not in summary:
        return ""
    precision = summary.get("mixed_precision")
    words = f"Distillation: {summary['steps']} steps"
    if precision is not None:  # recorded since the precision follows the launch config
        words += (f", mixed precision {precision} (teacher {summary.get('teacher_dtype')}, frozen parts "
                  f"{summary.get('frozen_dtype')}, trained weights {summary.get('trainable_dtype')})")
    processes = summary.get("processes")
    if isinstance(processes, int) and processes > 1:
        words += f", {processes} processes ({summary.get('distributed', 'distributed')})"
    return words + "."


def usage_section(folder: str | os.PathLike, repo_id: str | None) -> str:
    """The card's "How to use" text for the pipeline folder ``folder`` as it is published under ``repo_id``.

    It shows the loading code for the folder's export format (``hprune export``; a folder not
    exported yet is described as ``hprune push`` would export it by default). Without ``repo_id``,
    for a folder that is no export: the code that loads the folder itself, where it is (after
    ``import diffusers_hprune``); for an export: the code that loads it from ``folder``.
    """
    import jinja2

    folder = Path(folder)
    config, plan = folder_plan(folder)
    family = get_family(config)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    specs = family.block_specs(config)
    export_format = folder_format(folder)
    load_format = export_format or (default_format(plan) if repo_id else "local")
    return jinja2.Template(USAGE.read_text(encoding="utf-8"), keep_trailing_newline=False).render(
        load_format=load_format, export_format=default_format(plan), repo_id=repo_id or str(folder),
        dtype="torch.bfloat16",
        quantized=bool(config.get("quantization_config")), method=quantization_method(config),
        base_class=family.base_class_name,
        pipeline_class=stock_pipeline_name(index.get("_class_name", "")), family=family.display_name,
        kept_blocks=len(specs) - len(plan.removed_blocks), total_blocks=len(specs), plan_file=PLAN_FILE,
        module_name=MODULE_NAME,
    ).strip()


def rewrite_usage(card: str, folder: str | os.PathLike, repo_id: str | None = None,
                  where: str | os.PathLike | None = None) -> str:
    """``card`` (a README.md) with its "How to use" section rendered again for ``folder`` (an export of it) as it is
    published under ``repo_id``; by default under the Hub id (``ORG/NAME``) the section names, else from ``where``
    (default ``folder``), the path the snippet then loads it from. A card without the section gets it at the end.
    """
    start = card.find(USAGE_HEADING + "\n")
    following = card.find("\n## ", start + len(USAGE_HEADING)) if start >= 0 else -1
    old = card[start:following if following >= 0 else len(card)] if start >= 0 else ""
    named = re.search(r'from_pretrained\(\s*"([^"]+)"', old)
    if repo_id is None:  # a local folder's snippet (after `import diffusers_hprune`) names a path, not a repository
        repo_id = named.group(1) if named and "import diffusers_hprune" not in old else str(where or folder)
    section = f"{USAGE_HEADING}\n\n{usage_section(folder, repo_id)}\n\n"
    if start < 0:
        return card.rstrip("\n") + "\n\n" + section
    return card[:start] + section + (card[following + 1:] if following >= 0 else "")


def write_model_card(folder: str | os.PathLike, *, base_model: str, evaluation: dict | str | os.PathLike | None = None,
                     grid: str | os.PathLike | None = None, **kwargs: Any) -> Path:
    """Render the card and write ``folder/README.md`` (and copy ``grid`` to ``folder/samples.png``)."""
    folder = Path(folder)
    if evaluation is not None and not isinstance(evaluation, dict):
        evaluation = _read_json(Path(evaluation))
        if evaluation is None:
            raise CardError("The evaluation file does not exist; run `hprune evaluate TEACHER STUDENT --out FILE`.")
    image = None
    if grid is not None:
        if not Path(grid).is_file():
            raise CardError(f"The sample grid {grid} does not exist; write it with `hprune evaluate ... --grid FILE`.")
        image = GRID_NAME
    card = render_model_card(folder, base_model=base_model, evaluation=evaluation, grid=image, **kwargs)
    if grid is not None and Path(grid).resolve() != (folder / GRID_NAME).resolve():
        with atomic_path(folder / GRID_NAME) as tmp_image:
            shutil.copyfile(grid, tmp_image)
    atomic_write_text(folder / "README.md", str(card))
    return folder / "README.md"


__all__ = ["CardError", "render_model_card", "rewrite_usage", "usage_section", "write_model_card"]
