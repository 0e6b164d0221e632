"""Test helpers: model inputs, and a reference for removal built from forward hooks on the ORIGINAL model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from diffusers_hprune import PrunePlan, get_family

#: Plans for the tiny models of toy.components (SD3: 4 blocks, 0 and 1 dual-attention; FLUX: 2 double + 3 single)
#: that remove whole blocks and components, and slice FLUX single-block proj_out (blocks 3 and 4).
MIXED_PLANS = {
    "sd3": PrunePlan(removed_blocks=[1], removed_components={0: ["attn"], 2: ["ff_context", "norm1"]}, family="sd3",
                     num_blocks=4),
    "flux": PrunePlan(removed_blocks=[0], removed_components={1: ["ff"], 3: ["mlp"], 4: ["attn"]}, family="flux",
                      num_blocks=5),
}
_BUILT = {}


def tiny_pipeline(family: str, **transformer_overrides):
    """A fresh copy of one tiny pipeline per family and overrides.

    Copies, not new builds: two builds differ (the toy CLIP tokenizer's BPE training breaks ties
    differently each time, so the same prompt gets other token ids), and a test comparing images
    of two pipelines needs them to share their text encoders and tokenizers.
    """
    import copy

    from diffusers_hprune.toy.components import tiny_flux_pipeline, tiny_sd3_pipeline

    key = (family, tuple(sorted(transformer_overrides.items())))
    if key not in _BUILT:
        build = tiny_sd3_pipeline if family.startswith("sd3") else tiny_flux_pipeline
        _BUILT[key] = build(seed=0, **transformer_overrides)
        _BUILT[key].set_progress_bar_config(disable=True)
    return copy.deepcopy(_BUILT[key])


def transformer_inputs(transformer, batch: int = 2, seed: int = 0) -> dict:
    """Random inputs of the right shapes for an SD3 or FLUX transformer."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    if get_family(transformer).name == "sd3":
        return dict(
            hidden_states=torch.randn(batch, cfg.in_channels, 8, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, 7, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            timestep=torch.tensor([500.0, 125.0][:batch]),
        )
    n_img, n_txt = 16, 6
    img_ids = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    return dict(
        hidden_states=torch.randn(batch, n_img, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5, 0.125][:batch]),
        img_ids=torch.cat([torch.zeros(n_img, 1), img_ids.float()], 1),
        txt_ids=torch.zeros(n_txt, 3),
    )


def _zeros_like_output(module, args, kwargs, output):
    if isinstance(output, tuple):
        return tuple(None if o is None else torch.zeros_like(o) for o in output)
    return torch.zeros_like(output)


def _unmodulated(module, args, kwargs, output):
    """Replace an AdaLN output by a plain LayerNorm (eps 1e-6), shifts/scales 0, gates 1."""
    x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
    normed = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    if not isinstance(output, tuple):  # AdaLayerNormContinuous: just the normalised tensor
        return normed
    if len(output) == 2:  # AdaLayerNormZeroSingle: x, gate
        return normed, torch.ones_like(output[1])
    if len(output) == 5:  # AdaLayerNormZero: x, gate_msa, shift_mlp, scale_mlp, gate_mlp
        g = output[1]
        return normed, torch.ones_like(g), torch.zeros_like(g), torch.zeros_like(g), torch.ones_like(g)
    if len(output) == 7:  # SD35AdaLayerNormZeroX: ..., norm_hidden_states2, gate_msa2
        g = output[1]
        return normed, torch.ones_like(g), torch.zeros_like(g), torch.zeros_like(g), torch.ones_like(g), normed, torch.ones_like(g)
    raise AssertionError(f"unexpected norm output of length {len(output)}")


def _identity_block(module, args, kwargs, output):
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


# What each canonical component is in the stock Diffusers modules, for the reference.
_REFERENCE_HOOKS = {
    "attn": [("attn", _zeros_like_output), ("attn2", _zeros_like_output)],
    "ff": [("ff", _zeros_like_output)],
    "ff_context": [("ff_context", _zeros_like_output)],
    "mlp": [("proj_mlp", _zeros_like_output)],
    "norm1": [("norm1", _unmodulated)],
    "norm1_context": [("norm1_context", _unmodulated)],
    "norm": [("norm", _unmodulated)],
}


@contextlib.contextmanager
def reference_removal(transformer, removed_blocks=(), removed_components=None):
    """Hooks on an unpruned transformer so that its forward skips the given parts (DESIGN.md section 5)."""
    family = get_family(transformer)
    blocks = family.block_modules(transformer)
    handles = []
    try:
        for index in removed_blocks:
            handles.append(blocks[index].register_forward_hook(_identity_block, with_kwargs=True))
        for index, names in (removed_components or {}).items():
            for name in names:
                for attr, hook in _REFERENCE_HOOKS[name]:
                    sub = getattr(blocks[index], attr, None)
                    if sub is not None:
                        handles.append(sub.register_forward_hook(hook, with_kwargs=True))
        yield transformer
    finally:
        for h in handles:
            h.remove()


def fill_hf_cache(folder, repo_id: str, cache_dir, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay ``folder`` out in ``cache_dir`` exactly as huggingface_hub stores a downloaded snapshot
    (content-addressed blobs, a snapshot of symlinks, refs/main), so it loads with HF_HUB_OFFLINE=1."""
    import hashlib
    import os
    from pathlib import Path

    root = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for path in Path(folder).rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def folder_state(folder):
    """Names, sizes, modification times and content digests of everything under ``folder`` (nothing written or lost)."""
    import hashlib
    from pathlib import Path

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, digest(p)) for p in sorted(Path(folder).rglob("*"))}


def imagefolder(folder, n: int = 6, seed: int = 3):
    """``n`` toy training images as PNG files with captions in ``metadata.jsonl`` (an ``imagefolder`` dataset)."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from diffusers_hprune import toy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (image, caption) in enumerate(toy.sample(n, "train", seed=seed)):
        Image.fromarray((toy.dataset.to_array(image) * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
        rows.append(json.dumps({"file_name": f"{k}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def tiny_unet():
    """A small UNet2DModel: a Diffusers model of a family diffusers-hprune does not prune."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def failure_output(stderr: str, limit: int = 3000) -> str:
    """What to show of a failed process group's ``stderr``: where a rank crashed, Python's fault handler wrote
    "Fatal Python error" and the stack of each thread before a long list of extension modules, so the
    tail alone hides the cause. Each such report's first lines, then the tail."""
    heads = []
    for part in stderr.split("Fatal Python error")[1:]:
        heads.append("Fatal Python error" + part.split("\nExtension modules")[0][:limit])
    return "\n...\n".join(heads + [stderr[-limit:]])


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous: a fixed port (or the launchers' default
    29500) can still be held by another test's group or a stale process, and the launch then aborts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_process_group(cmd, *, timeout: float, env=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a command, or an ``accelerate launch`` and its ranks) as the leader of a process group of its own.

    On timeout every descendant (torchrun starts each rank in a session of its own, outside the
    group) and the group get SIGABRT first, so that Python's fault handler (``PYTHONFAULTHANDLER``,
    set here) writes each one's stack to the captured stderr, then SIGKILL, and the test fails with
    that output: a hang names where it hangs, and no process outlives the test. Reading the output
    never waits without a bound (``subprocess.run(timeout=...)`` kills only the child, then waits for
    pipes that a rank still holds open: a hang would hang the test). A rank still alive after the
    launcher returned also fails the test (and is killed).
    """
    import psutil

    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)

    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def signal_all(sig, processes) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        for p in processes:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    descendants: dict[int, psutil.Process] = {}  # every process the launcher started, seen while it ran
    end = time.monotonic() + timeout
    while True:
        try:
            out, err = proc.communicate(timeout=min(1.0, max(0.1, end - time.monotonic())))
            break
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                descendants.update((p.pid, p) for p in psutil.Process(proc.pid).children(recursive=True))
            if time.monotonic() < end:
                continue
        descendants = list(descendants.values())
        signal_all(signal.SIGABRT, descendants)  # each Python process dumps its threads' stacks
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            signal_all(signal.SIGKILL, descendants)
            try:
                out, err = proc.communicate(timeout=30)  # everything read since the start
            except subprocess.TimeoutExpired:
                out, err = "", "(the output could not be read: a process outside the group holds it)"
        signal_all(signal.SIGKILL, descendants)  # a rank the launcher left behind
        pytest.fail(f"{' '.join(map(str, cmd[:8]))} ... did not end within {timeout} s; it and every process it "
                    f"started were killed (SIGABRT, then SIGKILL). Last output, with each process's stacks:\n"
                    f"{err[-12000:]}")
    deadline = time.monotonic() + 10  # ranks that exited may take a moment to be reaped
    while group_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive():
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"a process of {' '.join(map(str, cmd[:6]))} ... outlived its launcher; killed it. "
                    f"Last output:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def record_keyword(monkeypatch, module, name: str, keyword: str) -> list:
    """Wrap ``module.name`` (a function) so that every call records its keyword argument ``keyword`` (None when not
    given) and then runs as before; returns the list the calls fill."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs.get(keyword))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def hprune_cli(*args, env_extra=None):
    """``(command, env)`` running ``hprune ARGS`` in a subprocess with one thread (tests run beside each other)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return [sys.executable, "-m", "diffusers_hprune", *args], env
