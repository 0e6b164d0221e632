"""Train the embedded toy pipelines (``hprune toy-train`` / ``python -m diffusers_hprune.toy.train``).

Three stages, each reproducible from ``--seed``:

1. ``vae``: an ``AutoencoderKL`` (2x downsampling, 4 latent channels) trained on the
   shapes dataset; its ``shift_factor`` / ``scaling_factor`` come from latent statistics.
2. ``sd3`` / ``flux``: the transformer of a ``StableDiffusion3Pipeline`` (12 joint blocks,
   the first three with dual attention, like SD3.5 Medium) or a ``FluxPipeline``
   (4 double + 8 single blocks), trained by rectified-flow matching on cached VAE
   latents, with the text encoders frozen at their seeded initialisation (as SD3
   trains with frozen encoders), timesteps shifted towards high noise (SD3's
   shift 3, in training and sampling), 10 % caption dropout for classifier-free
   guidance and an EMA of the weights. Training runs for a wall-clock budget.
3. The pipeline is saved (fp16 weights) with ``save_pretrained``.

``sd3-deep`` / ``flux-deep`` are the seed models' depths (38 joint blocks; 19 double + 38 single) at width 64, with
every other component taken from the shipped toy of their family (no VAE stage). A transformer's training resumes
from ``<out>.state`` (:mod:`diffusers_hprune.toy.train_state`) when run again with the same settings.

Run the two transformers in parallel with one thread each to use both cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffusers_hprune.architecture import get_family
from diffusers_hprune.toy import NAMES, evaluate_pipeline, load_pipeline, toy_family
from diffusers_hprune.toy import dataset as D
from diffusers_hprune.toy import train_state as S
from diffusers_hprune.toy.components import build_flux_pipeline, build_sd3_pipeline, build_vae
from diffusers_hprune.utils.checks import check_replaceable
from diffusers_hprune.utils.fileio import atomic_directory, atomic_write_json, safetensors_user_modes

TEXT_LENGTH = 10  # CLIP and T5 tokens per prompt (the longest prompt needs 9)
TOY_CONFIGS = {
    "sd3": dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=12,
        attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=96,
        pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm",
    ),
    "flux": dict(
        patch_size=1, in_channels=16, num_layers=4, num_single_layers=8, attention_head_dim=24,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 8, 8),
    ),
    # The seed models' depths (SD3.5 Large: 38 joint blocks, the last context_pre_only, no dual attention;
    # FLUX.1: 19 double + 38 single blocks) at width 64, so that they train on 2 CPU cores.
    "sd3-deep": dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=38,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64,
        pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(), qk_norm="rms_norm",
    ),
    "flux-deep": dict(
        patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
}
CHECKPOINT_MINUTES = 10.0  # how often the resumable state is written while training
SHIFT = 3.0
CAPTION_DROPOUT = 0.1


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------- VAE
def train_vae(out: Path, seed: int = 0, steps: int = 1500, batch: int = 32, n_images: int = 20000) -> Path:
    """Train the shared toy VAE and save it to ``out`` (a diffusers model folder)."""

    torch.manual_seed(seed)
    vae = build_vae(latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8)
    images = _images_to_tensor([im for im, _ in D.sample(n_images, "train", seed=seed)])
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, 4096, 256)])
        recon = torch.cat([vae.decode(vae.encode(images[i : i + 256]).latent_dist.mean).sample for i in range(0, 1024, 256)])
    shift, scale = float(z.mean()), float(1.0 / z.std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(recon, images[:1024])))
    _log(f"vae: reconstruction PSNR {psnr:.2f} dB, latent shift {shift:.4f}, scale {scale:.4f}")
    vae.save_pretrained(out)
    safetensors_user_modes(out)
    (out / "training.json").write_text(json.dumps({"steps": steps, "batch": batch, "seed": seed, "psnr_db": psnr}, indent=2))
    return out


# ---------------------------------------------------------------------------- transformer
def build_toy_pipeline(name: str, vae=None, seed: int = 0):
    """The untrained toy pipeline ``name`` (a key of ``TOY_CONFIGS``).

    ``sd3`` / ``flux``: built in code around ``vae`` (tokenizers from the dataset vocabulary, text encoders at their
    seeded initialisation). ``sd3-deep`` / ``flux-deep``: every component but the transformer is the shipped toy's of
    the same family (the same text encoders, tokenizers, VAE and scheduler), with a new transformer of the deep shape.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    family = toy_family(name)
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    if name != family:
        base = load_pipeline(family)
        torch.manual_seed(seed)
        return type(base)(**{**base.components, "transformer": cls(**TOY_CONFIGS[name])})
    torch.manual_seed(seed)
    words = D.vocabulary()
    transformer = cls(**TOY_CONFIGS[name])
    if family == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
        return build_sd3_pipeline(transformer, words, seed=seed, clip_hidden=32, t5_d_model=64,
                                  text_length=TEXT_LENGTH, vae=vae, scheduler=scheduler)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT, use_dynamic_shifting=False)
    return build_flux_pipeline(transformer, words, seed=seed, clip_hidden=32, t5_d_model=64,
                               text_length=TEXT_LENGTH, vae=vae, scheduler=scheduler)


@torch.no_grad()
def encode_prompts(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings and pooled embeddings of ``texts`` with the pipeline's frozen encoders."""

    text = get_family(pipe.transformer).encode_text(pipe, texts, TEXT_LENGTH)
    return text["prompt_embeds"], text["pooled_projections"]


@torch.no_grad()
def encode_latents(vae, images, batch: int = 512) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        z = vae.encode(_images_to_tensor(images[i : i + batch])).latent_dist.mean
        out.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


def _sample_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps shifted towards high noise (SD3's shift)."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def _predict(family: str, transformer, x_t, sigmas, embeds, pooled):
    """The transformer's velocity for ``x_t`` (``B, C, H, W``); the family module knows the conventions."""

    fam = get_family(transformer)
    text = {"prompt_embeds": embeds, "pooled_projections": pooled}
    out = transformer(**fam.denoiser_inputs(transformer, x_t, sigmas, text), return_dict=False)[0]
    return fam.denoiser_output(out, x_t)


def flow_matching_loss(family, transformer, x0, embeds, pooled, gen) -> torch.Tensor:
    """Rectified-flow loss: predict v = noise - x0 at x_t = (1 - s) x0 + s noise."""
    sigmas = _sample_sigmas(x0.shape[0], gen)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigmas[:, None, None, None]
    x_t = (1 - s) * x0 + s * noise
    return F.mse_loss(_predict(family, transformer, x_t, sigmas, embeds, pooled), noise - x0)


def _training_data(pipe, n_images: int, seed: int):
    """Cached training data: VAE latents of ``n_images`` drawings, their caption indices, and every caption's text
    embeddings (the last is the empty prompt)."""
    train_specs = sorted({s.text for specs in D.split_prompts("train").values() for s in specs})
    texts = train_specs + [""]
    embeds, pooled = encode_prompts(pipe, texts)
    index = {t: i for i, t in enumerate(texts)}
    data = D.sample(n_images, "train", seed=seed)
    latents = encode_latents(pipe.vae, [im for im, _ in data])
    captions = torch.tensor([index[c] for _, c in data])
    return latents, captions, embeds, pooled, index[""]


def train_transformer(name: str, vae_dir: Path | None, out: Path, minutes: float = 45.0, seed: int = 0, batch: int = 32,
                      lr: float = 8e-4, n_images: int = 40000, max_steps: int | None = None, eval_prompts: int = 60,
                      checkpoint_minutes: float = CHECKPOINT_MINUTES) -> Path:
    """Train the toy transformer ``name`` for a wall-clock budget (or until ``max_steps`` in all) and save the whole
    pipeline, with the EMA weights, to ``out``.

    Resumable: the state is kept in ``<out>.state`` (:mod:`~diffusers_hprune.toy.train_state`), every
    ``checkpoint_minutes`` and at the end; a later call with the same ``out`` and settings continues it, so
    ``minutes`` is the budget of this call. ``vae_dir`` is the trained VAE of ``sd3`` / ``flux``; the deep toys
    take every component but the transformer from the shipped toy of their family (``vae_dir`` must be None).
    """
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    start = time.time()
    family = toy_family(name)
    if (vae_dir is None) == (name == family):
        raise ValueError(f"{name}: {'give the trained VAE (--vae)' if vae_dir is None else 'takes the shipped toy VAE; leave --vae out'}")
    out = Path(out)
    check_replaceable(out)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval() if vae_dir is not None else None
    pipe = build_toy_pipeline(name, vae, seed=seed)
    transformer = pipe.transformer
    settings = {"name": name, "seed": seed, "batch": batch, "lr": lr, "n_images": n_images,
                "config": json.loads(json.dumps(TOY_CONFIGS[name]))}
    folder = S.state_folder(out)
    saved = S.check_resumable(folder, settings)
    latents, captions, embeds, pooled, empty = _training_data(pipe, n_images, seed)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    ema = EMAModel(transformer.parameters(), decay=0.999)
    gen = torch.Generator().manual_seed(seed)
    progress = {"step": 0, "minutes": 0.0, "runs": 0, "loss": None, "evaluations": []}
    if saved is not None:
        S.load_state(folder, saved, transformer, opt, ema, gen)
        progress = {k: saved.get(k, v) for k, v in progress.items()}
    _log(f"{name}: {sum(p.numel() for p in transformer.parameters()):,} parameters; {len(latents)} images cached in "
         f"{time.time() - start:.0f}s; " + (f"resuming at step {progress['step']}" if saved else "starting"))

    warmup, t0, losses, last_save = 200, time.time(), [], time.time()
    budget = minutes * 60 - (time.time() - start)

    def save():
        progress["loss"] = float(np.mean(losses[-250:])) if losses else progress["loss"]
        S.save_state(folder, settings, progress | {"minutes": progress["minutes"] + (time.time() - t0) / 60}, transformer, opt, ema, gen)

    while (time.time() - t0 < budget) and (max_steps is None or progress["step"] < max_steps):
        pick = torch.randint(len(latents), (batch,), generator=gen)
        cap = captions[pick].clone()
        cap[torch.rand(batch, generator=gen) < CAPTION_DROPOUT] = empty
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (progress["step"] + 1) / warmup)
        loss = flow_matching_loss(family, transformer, latents[pick], embeds[cap], pooled[cap], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema.step(transformer.parameters())
        losses.append(loss.item())
        progress["step"] += 1
        if progress["step"] % 250 == 0:
            _log(f"{name}: step {progress['step']}, loss {np.mean(losses[-250:]):.4f}, {len(losses) / (time.time() - t0):.2f} steps/s")
        if time.time() - last_save > checkpoint_minutes * 60:
            save()
            last_save = time.time()
    progress["runs"] += 1
    save()
    progress["minutes"] += (time.time() - t0) / 60
    _log(f"{name}: at step {progress['step']} after {progress['minutes']:.1f} min of training in {progress['runs']} run(s)")
    ema.copy_to(transformer.parameters())
    _save_pipeline(pipe, out, {"family": family, "name": name, "steps": progress["step"], "batch": batch, "lr": lr,
                               "seed": seed, "shift": SHIFT, "caption_dropout": CAPTION_DROPOUT,
                               "minutes": round(progress["minutes"], 1), "runs": progress["runs"],
                               "final_loss": progress["loss"], "evaluations": progress["evaluations"]})
    if eval_prompts:
        result = evaluate_pipeline(load_pipeline(out), n=eval_prompts)
        _log(f"{name}: ShapeEval on {eval_prompts} held-out prompts: " + json.dumps({k: round(v, 3) for k, v in result.items()}))
        progress["evaluations"].append({"step": progress["step"], "prompts": eval_prompts, "overall": round(result["overall"], 4)})
        atomic_write_json(out / "training.json", json.loads((out / "training.json").read_text())
                          | {"evaluations": progress["evaluations"]})
        S.record(folder, evaluations=progress["evaluations"])
    return out


def _save_pipeline(pipe, out: Path, info: dict) -> None:
    """Write the pipeline to ``out`` atomically: transformer and VAE in fp16, the text encoders in fp32 (which
    transformers 5 keeps), so the plain ``from_pretrained(out)`` gives one dtype; ``training.json`` beside."""
    import copy

    pipe = type(pipe)(**{**pipe.components, "transformer": copy.deepcopy(pipe.transformer).to(torch.float16),
                         "vae": copy.deepcopy(pipe.vae).to(torch.float16)})
    with atomic_directory(out, overwrite=True) as tmp:
        pipe.save_pretrained(tmp)
        safetensors_user_modes(tmp)
        atomic_write_json(tmp / "training.json", info)


def train_all(out: Path, minutes: float = 55.0, seed: int = 0, toys=("sd3", "flux")) -> dict[str, Path]:
    """Train ``toys`` into ``out/<name>``, each in its own process at once (one thread each when several); the
    12-block toys first need the VAE, trained into ``out/vae`` unless it is there. Each toy resumes from its state."""
    import subprocess
    import sys

    out = Path(out)
    if any(toy_family(t) == t for t in toys) and not (out / "vae" / "training.json").is_file():
        train_vae(out / "vae", seed=seed)
    procs = {}
    for name in toys:
        cmd = [sys.executable, "-m", "diffusers_hprune.toy.train", name, "--out", str(out / name),
               "--minutes", str(minutes), "--seed", str(seed)] + (["--threads", "1"] if len(toys) > 1 else [])
        cmd += ["--vae", str(out / "vae")] if toy_family(name) == name else []
        log = open(out / f"{name}.log", "a")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
        _log(f"{name}: training in the background, log in {out / f'{name}.log'}")
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if failed:
        raise RuntimeError(f"training failed for {failed}; see the logs in {out}")
    return {n: out / n for n in (["vae"] if (out / "vae").is_dir() else []) + list(toys)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_hprune.toy.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["all", "vae", *NAMES],
                        help="what to train (all: vae, then sd3 and flux at once; the deep toys need no --vae)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--vae", help="trained VAE folder (for sd3 / flux)")
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="wall-clock budget of this run for a transformer (default 45); a later run resumes")
    parser.add_argument("--max-steps", type=int, default=None, help="stop at this many steps in all (tests)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=None, help="dataset size (default 20000 for vae, 40000 otherwise)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--eval-prompts", type=int, default=60, help="held-out prompts scored after training (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 per process when training two at once)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.stage == "all":
        train_all(out, minutes=args.minutes, seed=args.seed)
    elif args.stage == "vae":
        train_vae(out, seed=args.seed, steps=args.vae_steps, batch=args.batch or 32, n_images=args.images or 20000)
    else:
        if not args.vae and args.stage in ("sd3", "flux"):
            parser.error("--vae is required to train a transformer (train it first: `... vae --out DIR`)")
        if args.vae and args.stage not in ("sd3", "flux"):
            parser.error(f"{args.stage} takes the shipped {toy_family(args.stage)} toy's VAE and text encoders; leave --vae out")
        train_transformer(args.stage, Path(args.vae) if args.vae else None, out, minutes=args.minutes, seed=args.seed, batch=args.batch or 32,
                          n_images=args.images or 40000, max_steps=args.max_steps, eval_prompts=args.eval_prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
