"""tests/helpers.run_process_group: a hung launch ends the test, and no process it started outlives it.

torchrun starts each rank in a session of its own; such a rank, left behind when its launcher died, held the
captured output open, and reading it waited forever (CI ran out of time in the option matrix)."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
from helpers import failure_output, run_process_group

LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; print('rank up', flush=True); time.sleep(600)"],
                        start_new_session=True)
print("rank", rank.pid, flush=True)
time.sleep(float(sys.argv[1]))
"""


@pytest.mark.parametrize("launcher_seconds", [600, 2])  # the launcher hangs too; the launcher exits, the rank stays
def test_a_rank_in_its_own_session_is_killed_and_the_test_fails_in_bounded_time(launcher_seconds):
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not end within 5 s"):
        run_process_group([sys.executable, "-c", LAUNCHER, str(launcher_seconds)], timeout=5)
    assert time.monotonic() - started < 60
    time.sleep(0.5)
    rank_alive = [p for p in psutil.process_iter(["cmdline"])
                  if "print('rank up'" in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE]
    assert not rank_alive, rank_alive


def test_a_crashed_rank_shows_its_fault_report_not_only_the_tail():
    crash = ("Fatal Python error: Aborted\n\nThread 0x1 (most recent call first):\n  File \"step.py\", line 7 in "
             "backward\n\nExtension modules: " + ", ".join(f"mod{i}" for i in range(2000)) + " (total: 2000)\n")
    stderr = "W launcher note\n" + crash + "E ChildFailedError: rank 1 exitcode -6\n"
    shown = failure_output(stderr)
    assert shown.startswith("Fatal Python error: Aborted") and 'line 7 in backward' in shown
    assert shown.endswith("E ChildFailedError: rank 1 exitcode -6\n")  # the tail still follows
    assert "mod5," not in shown.split("\n...\n")[0]  # the module list is cut from the report
    assert failure_output("plain error\n") == "plain error\n"  # nothing crashed: the tail alone
