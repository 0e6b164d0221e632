"""The run folder of a distillation (``--output_dir``): what marks it, resuming from its checkpoints, the checks that a
checkpoint belongs to this run, the progress kept in each, and what an interrupted run leaves behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from diffusers_hprune.contributions import fingerprint
from diffusers_hprune.distillation.settings import IDENTITY_OPTIONS, DistillConfig, DistillError
from diffusers_hprune.loading import pipeline_folder
from diffusers_hprune.utils.checks import InputError, check_apart, check_not_inside, check_output_folder
from diffusers_hprune.utils.fileio import atomic_write_json, safetensors_user_modes
from diffusers_hprune.utils.interrupts import uninterrupted

RUN_FILE = "hprune_run.json"  # the run's identity: in OUTPUT_DIR (the marker of a run folder) and in each checkpoint

PROGRESS_FILE = "hprune_progress.json"  # in each checkpoint: the losses, seconds and start loss so far

SUMMARY_FILE = "distill_summary.json"

#: What an interrupted run leaves in OUTPUT_DIR, removed at the next start (nothing else is): folders of a pipeline
#: being saved or a checkpoint being written, and files of a JSON file being replaced (``atomic_write_json``).
LEFTOVER_FOLDER = re.compile(r"\.pipeline\.[a-z0-9_]+|\.checkpoint-\d+\.tmp")

LEFTOVER_FILE = re.compile(r"\.(hprune_run|distill_summary|plan)\.json\.(?:[A-Za-z0-9-]+-\d+\.)?[a-z0-9_]+\.tmp")


def _run_identity(models, groups, config: DistillConfig, *, data: dict, use_sg: bool, processes: int) -> dict:
    """What a checkpoint must share with the run resuming from it: everything that changes the result.

    The teacher's weights, the plan, the analysis (a digest of its file), the training data (by
    content: :func:`data.data_identity`), every option of :data:`IDENTITY_OPTIONS`, whether
    SGDistill is in use, the number of processes, and the parameter groups and counts they give.
    As it reads back from JSON (lists, not tuples), so that a saved identity compares equal.
    """
    identity = {
        "teacher": fingerprint(models.teacher), "plan": models.plan.to_dict(),
        "analysis": _file_digest(config.analysis, "--analysis"), "data": data,
        **{name: getattr(config, name) for name in IDENTITY_OPTIONS},
        "sgdistill_in_use": use_sg, "processes": processes,
        "param_groups": [g.name for g in groups], "trainable": sum(g.numel for g in groups),
        "parameters": sum(p.numel() for p in models.student.parameters()),
    }
    return json.loads(json.dumps(identity, default=str))


def _file_digest(path: str | None, flag: str) -> str | None:
    """The sha256 of a file's bytes (None for no file)."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise DistillError(f"Cannot read {flag} {path} ({e.strerror or e}); check the path and its permissions.") from None


def _resume_path(config: DistillConfig, output_dir: Path) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        return _latest_checkpoint(output_dir) if output_dir.is_dir() else None
    path = Path(config.resume_from_checkpoint)
    if not (path.is_dir() and _checkpoint_step(path) is not None):
        raise DistillError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder; give one written by "
                           "this command, or 'latest'.")
    return path


def _check_resume(path: Path, identity: dict) -> None:
    """Refuse a checkpoint whose run identity differs from this run's, naming each differing value."""
    try:
        saved = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DistillError(f"{path} has no readable {RUN_FILE}: it is not a checkpoint of `hprune distill`; resume "
                           "from one of this run's checkpoints, or start without --resume_from_checkpoint.") from None
    differences = _differences(saved if isinstance(saved, dict) else {}, identity)
    if differences:
        names = list(dict.fromkeys(name.split(".")[0] for name, _ in differences))
        shown = "; ".join(text for _, text in differences[:12])
        more = f"; and {len(differences) - 12} more" if len(differences) > 12 else ""
        raise DistillError(f"{path} is a checkpoint of another run (different {', '.join(names)}): {shown}{more}. "
                           "Resume with the settings it was made with, or start a new run with --overwrite (which "
                           "deletes this run's checkpoints) or in another --output_dir.")


def _differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``(name, "name: checkpoint A, now B")`` for each value that differs; nested dicts compared key by key.

    A value the checkpoint does not record (made by an older version) differs.
    """
    out = []
    for key in list(now) + [k for k in saved if k not in now]:
        name = f"{prefix}{key}"
        if key not in saved:
            out.append((name, f"{name}: checkpoint (not recorded), now {_shown(now[key])}"))
        elif key not in now:
            out.append((name, f"{name}: checkpoint {_shown(saved[key])}, now (none)"))
        elif isinstance(saved[key], dict) and isinstance(now[key], dict):
            out += _differences(saved[key], now[key], f"{name}.")
        elif saved[key] != now[key]:
            out.append((name, f"{name}: checkpoint {_shown(saved[key])}, now {_shown(now[key])}"))
    return out


def _shown(value, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _holds_a_run(output_dir: Path) -> bool:
    """A run of this command with progress in ``output_dir``: checkpoints or a saved pipeline."""
    if not output_dir.is_dir():
        return False
    return (output_dir / "model_index.json").exists() or _latest_checkpoint(output_dir) is not None


def _is_run_folder(folder: Path) -> bool:
    """A folder this command writes into: its marker, a checkpoint of it, or (before the marker) a saved run."""
    return ((folder / RUN_FILE).is_file() or bool(_own_checkpoints(folder))
            or ((folder / SUMMARY_FILE).is_file() and (folder / "model_index.json").is_file()))


def _checkpoint_step(path: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else ``None``."""
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = [(step, p) for p in output_dir.glob("checkpoint-*") if (step := _checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _own_checkpoints(output_dir: Path) -> list[Path]:
    """This command's ``checkpoint-<step>`` folders (with their ``hprune_run.json``), oldest first; nothing else."""
    found = [(step, p) for p in output_dir.glob("checkpoint-*")
             if (step := _checkpoint_step(p)) is not None and (p / RUN_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _remove_unfinished(output_dir: Path) -> None:
    """A run that made ``output_dir`` and failed (a full disk, an error, SIGTERM) before its first checkpoint leaves
    nothing: the folder holds only its own bookkeeping then. With a checkpoint, everything stays (for resuming)."""
    if output_dir.is_dir() and not any(_checkpoint_step(p) is not None for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)


# -- the steps of distill(), in order ---------------------------------------------------------------
def _checked_output_dir(config: DistillConfig) -> Path:
    """``--output_dir``, refused before any work when writing there could change or delete what is not this run's.

    It must be a folder that can be written, not the teacher's folder nor inside it (with or
    without --overwrite), and either new, empty (but for the caller's ``keep_files``) or a run folder of this command
    (see :func:`_is_run_folder`): saving the pipeline replaces whole component folders.
    """
    output_dir = Path(config.output_dir)
    try:
        check_output_folder(output_dir, "--output_dir")
        for teacher in _teacher_folders(config.teacher):
            check_not_inside(output_dir, teacher, "--output_dir", "--teacher")
        # the training data: --overwrite of a folder that holds it would delete it (the plan may lie in a run folder:
        # the run writes its own copy there)
        check_apart(output_dir, "--output_dir", (config.prompts, "--prompts"), (config.train_data_dir, "--train_data_dir"))
    except InputError as e:
        raise DistillError(str(e)) from None
    if output_dir.is_dir() and not _is_run_folder(output_dir):
        entries = sorted(p.name for p in output_dir.iterdir() if p.name not in config.keep_files)
        if entries:
            found = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise DistillError(f"--output_dir {output_dir} is not empty and holds no run of `hprune distill` (found "
                               f"{found}): saving the pipeline there would replace or delete those files. Choose an "
                               "empty or new folder (--overwrite only replaces a run of this command).")
    return output_dir


def _teacher_folders(teacher: str) -> list[Path]:
    """The local folders the teacher is read from: the folder given, and the pipeline folder it resolves to."""
    folders = [Path(teacher)] if Path(teacher).is_dir() else []
    resolved = pipeline_folder(teacher)
    return folders + ([resolved] if resolved is not None else [])


def _resume_point(config: DistillConfig, output_dir: Path, say) -> Path | None:
    """The checkpoint to resume from, or None; refuses an output folder that holds another run."""
    resume_path = _resume_path(config, output_dir)
    if config.resume_from_checkpoint and resume_path is None:
        say(f"no checkpoint in {output_dir} to resume from; starting at step 0")
    if resume_path is None and not config.overwrite and _holds_a_run(output_dir):
        raise DistillError(f"{output_dir} already holds a distillation run (checkpoints or a saved pipeline); continue "
                           "it with --resume_from_checkpoint latest, replace it with --overwrite, or choose another "
                           "--output_dir.")
    return resume_path


def _prepare_output_dir(config: DistillConfig, output_dir: Path, resume_path, identity: dict, accelerator,
                        say) -> None:
    """Check the checkpoint belongs to this run and is whole, then (main process) make ``output_dir`` this run's.

    Nothing is written before the checks. Then what an interrupted run left is removed
    (:func:`_remove_leftovers`), a new run with --overwrite drops the old run's checkpoints
    (this command's only: the folder is a run folder, :func:`_checked_output_dir`), and the
    run's identity is written to ``output_dir/hprune_run.json``.
    """
    if resume_path is not None:
        _check_resume(resume_path, identity)
        _check_state_files(resume_path, accelerator)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not accelerator.is_main_process:
        return
    _remove_leftovers(output_dir, say)
    if config.overwrite and resume_path is None:
        for old in _own_checkpoints(output_dir):  # a new run: the old run's checkpoints must not be resumed
            shutil.rmtree(old)
    _write_identity(output_dir / RUN_FILE, identity)


def _remove_leftovers(output_dir: Path, say) -> None:
    """Delete the temporary copies an interrupted save or checkpoint left (only names this code creates)."""
    for entry in sorted(output_dir.iterdir()):
        if entry.is_symlink():
            continue
        if entry.is_dir() and LEFTOVER_FOLDER.fullmatch(entry.name):
            say(f"removing {entry}, left by an interrupted save")
            shutil.rmtree(entry)
        elif entry.is_file() and LEFTOVER_FILE.fullmatch(entry.name):
            say(f"removing {entry}, left by an interrupted save")
            entry.unlink()


def _write_identity(path: Path, identity: dict) -> None:
    """Write the run's identity, unless the file already holds it (a resumed run leaves it as it was)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")) == identity:
            return
    atomic_write_json(path, identity)


def _check_state_files(path: Path, accelerator) -> None:
    """The files ``accelerator.load_state`` reads are there and whole (cheap checks, before anything is written).

    Weights in safetensors (their header covers the file), optimizer state as a ``torch.save``
    zip (its directory at the end), and this command's progress record. FSDP / DeepSpeed write
    layouts of their own: there ``load_state`` alone checks.
    """
    from accelerate.utils import DistributedType
    from safetensors import SafetensorError, safe_open

    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    model, optimizer = path / "model.safetensors", path / "optimizer.bin"
    if not model.is_file() and not (path / "pytorch_model.bin").is_file():
        _damaged(path, f"{model.name} is missing")
    if not optimizer.is_file():
        _damaged(path, f"{optimizer.name} is missing")
    try:
        if model.is_file():
            with safe_open(str(model), "pt", device="cpu") as f:
                f.keys()
    except (OSError, SafetensorError) as e:
        _damaged(path, f"{model.name} cannot be read ({e})")
    try:
        with zipfile.ZipFile(optimizer):
            pass
    except (OSError, zipfile.BadZipFile) as e:
        _damaged(path, f"{optimizer.name} cannot be read ({e})")
    _Progress.load(path)


def _damaged(path: Path, what: str) -> NoReturn:
    raise DistillError(f"The checkpoint {path} is damaged: {what}. Resume from an earlier checkpoint "
                       f"(--resume_from_checkpoint {path.parent / 'checkpoint-N'}), or delete {path} and resume from "
                       "'latest' (the newest whole one).")


@dataclass
class _Progress:
    """What the summary covers across resumes: every step's losses, the seconds of all segments, the start loss."""

    losses: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    start_loss: float | None = None

    def to_dict(self, seconds: float) -> dict:
        return {"losses": self.losses, "seconds": seconds, "start_loss": self.start_loss}

    @classmethod
    def load(cls, checkpoint: Path) -> _Progress | None:
        """The progress saved with a checkpoint; None for a checkpoint of an older version (which saved none)."""
        path = checkpoint / PROGRESS_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls([dict(e) for e in data["losses"]], float(data["seconds"]), data["start_loss"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            _damaged(checkpoint, f"{PROGRESS_FILE} cannot be read ({type(e).__name__}: {e})")


def _checkpoint(accelerator, output_dir: Path, step: int, limit: int | None, identity: dict, progress: dict) -> None:
    """``save_state`` into ``.checkpoint-<step>.tmp`` with the identity and progress, renamed when complete.

    With ``limit`` only the newest ``limit`` of this command's checkpoints stay (other folders,
    ``checkpoint-best`` say, are never touched).
    """
    target = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            safetensors_user_modes(tmp)  # the weights Accelerate saved (safetensors writes 0600 whatever the umask)
            atomic_write_json(tmp / RUN_FILE, identity)
            atomic_write_json(tmp / PROGRESS_FILE, progress)
            with uninterrupted():  # the old checkpoint or the new one, never neither
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
    except BaseException:  # a full disk, a signal: no half-written checkpoint stays behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process and limit:
        for old in _own_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
