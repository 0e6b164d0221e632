"""Issue 32: a full disk, SIGTERM or a killed process leave no scratch behind, and never an output that looks
complete and is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffusers_hprune.cli import main
from diffusers_hprune.utils import fileio
from diffusers_hprune.utils.interrupts import raise_on_termination, uninterrupted


def _scratch(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_scratch_of_a_process_that_no_longer_runs_is_removed_at_the_next_write(tmp_path):
    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    host = fileio._host()
    left = [f".model.{host}-{pid}.k3j_9x.tmp", f".model.{host}-{pid}.old", f".model.{host}-{pid}.ab12.tmp.png"]
    for name in left:
        (tmp_path / name).mkdir() if name.endswith(".tmp") else (tmp_path / name).write_text("x")
    kept = [f".model.{host}-{os.getppid()}.live.tmp",  # a process that runs (pytest's parent)
            f".model.otherhost-{pid}.k3j_9x.tmp",  # another machine's (a shared file system)
            f".model.{host}-{pid}.notes", ".model.tmp", "model.old"]  # not scratch names
    for name in kept:
        (tmp_path / name).write_text("not ours to remove")
    with fileio.atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *kept])


CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from diffusers_hprune.utils.fileio import atomic_directory
    from diffusers_hprune.utils.interrupts import raise_on_termination
    raise_on_termination()
    out = Path(sys.argv[1])
    with atomic_directory(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
""")


def _overwrite_in_a_child(script: str, tmp_path: Path) -> list[str]:
    """Run ``script`` (which overwrites ``out``, an old output holding old.txt) in a child that gets SIGTERM; assert
    it ended with exit 143, and return what ``out`` holds then."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    return sorted(p.name for p in out.iterdir())


def test_sigterm_while_writing_removes_the_scratch_and_keeps_the_old_output(tmp_path):
    assert _overwrite_in_a_child(CHILD, tmp_path) == ["old.txt"]
    assert _scratch(tmp_path) == []


def test_a_signal_inside_uninterrupted_waits_for_the_block_to_end():
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    raise_on_termination()
    done = []
    try:
        with pytest.raises(SystemExit) as stopped:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between bytecodes: give it every chance
                    done.append(1)
                done.append("end")
        assert stopped.value.code == 128 + signal.SIGTERM and done[-1] == "end"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs: the disk fills during a write. Needs a user who may mount (CI's root does)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_a_full_disk_is_one_clear_error_naming_the_output(command, small_disk, capsys):
    from diffusers_hprune import toy

    out = small_disk / "out"
    assert main([command, str(toy.model_path("sd3")), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"no space left on the device holding {out}" in err and "Traceback" not in err
    assert list(small_disk.iterdir()) == []  # nothing left, no scratch


def test_safetensors_disk_full_error_is_recognised(monkeypatch, tmp_path, capsys):
    """safetensors raises its own SafetensorError (not an OSError) for a full disk."""
    from safetensors import SafetensorError

    from diffusers_hprune import toy

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    out = tmp_path / "q"
    assert main(["quantize", str(toy.model_path("sd3")), "--out", str(out)]) == 2
    assert f"no space left on the device holding {out}" in capsys.readouterr().err
    assert _scratch(tmp_path) == [] and not out.exists()


def test_main_hands_the_callers_signal_handlers_back(monkeypatch, tmp_path):
    """While a command runs, SIGTERM raises SystemExit(143) so its writers clean up; after ``main()`` returns, a
    program (or a test process) that called it has its own SIGTERM and SIGINT handlers again."""
    from safetensors import SafetensorError

    from diffusers_hprune import toy

    seen = {}

    def own_term(signum, frame):
        seen["caller"] = signum

    def full(*args, **kwargs):
        seen["during"] = signal.getsignal(signal.SIGTERM)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    before_int = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, own_term)
    try:
        assert main(["quantize", str(toy.model_path("sd3")), "--out", str(tmp_path / "q")]) == 2
        assert seen["during"] not in (own_term, signal.SIG_DFL)  # the command's own handler, while it ran
        assert signal.getsignal(signal.SIGTERM) is own_term and signal.getsignal(signal.SIGINT) is before_int
        os.kill(os.getpid(), signal.SIGTERM)  # the caller's handler runs: no SystemExit
        assert seen["caller"] == signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


SWAP = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from diffusers_hprune.utils import fileio
    from diffusers_hprune.utils.interrupts import raise_on_termination
    raise_on_termination()
    real = os.replace
    def replace(a, b):  # SIGTERM arrives in the middle of the swap, after the old output moved away
        real(a, b)
        if str(b).endswith(".old"):
            os.kill(os.getpid(), signal.SIGTERM)
    fileio.os.replace = replace
    out = Path(sys.argv[1])
    with fileio.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
""")


def test_sigterm_during_the_overwrite_swap_waits_and_leaves_the_new_output_only(tmp_path):
    assert _overwrite_in_a_child(SWAP, tmp_path) == ["new.txt"]  # the swap finished before the signal acted
    assert _scratch(tmp_path) == []  # and the old output it replaced is gone
