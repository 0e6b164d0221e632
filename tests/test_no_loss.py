"""Nothing lost, nothing reused that belongs to other settings: compress stages and analysis parts."""

from __future__ import annotations

import json

from diffusers_hprune.analysis import analyze
from diffusers_hprune.compression.run import STAMP, STARTED, _Stages

SMALL = dict(metric="velocity", n_prompts=2, eval_steps=1, progress=False)


def _stages(tmp_path):
    said = []
    return _Stages(tmp_path, said.append), said


def _work(log):
    def work(folder):
        log.append(sorted(p.name for p in folder.iterdir()))
        (folder / "checkpoint-1").mkdir()
    return work


def test_a_stage_whose_key_changed_starts_again_from_an_empty_folder(tmp_path):
    stages, said = _stages(tmp_path)
    folder = tmp_path / "4-distilled"
    folder.mkdir()
    (tmp_path / "4-distilled" / STARTED).write_text(json.dumps({"stage": "distilled", "key": "old"}))
    (folder / "checkpoint-20").mkdir()  # an interrupted stage of other settings
    seen = []
    stages.run(4, "distilled", {"learning_rate": 0.01}, _work(seen), keep_partial=True)
    assert seen == [[STARTED]]  # the old run's checkpoint is gone before the work starts
    assert "its settings changed" in said[0] and stages.rows[-1][1] == "ran"
    assert (folder / STAMP).is_file()


def test_an_interrupted_stage_of_the_same_key_resumes_and_a_finished_one_is_skipped(tmp_path):
    stages, said = _stages(tmp_path)
    inputs = {"learning_rate": 0.01}
    seen = []
    stages.run(4, "distilled", inputs, _work(seen), keep_partial=True)
    (tmp_path / "4-distilled" / STAMP).unlink()  # killed before the stamp: its checkpoint stays
    stages.run(4, "distilled", inputs, lambda folder: seen.append(sorted(p.name for p in folder.iterdir())),
               keep_partial=True)
    assert seen[1] == ["checkpoint-1", STARTED] and stages.rows[-1][1] == "resumed"
    stages.run(4, "distilled", inputs, lambda folder: seen.append("again"), keep_partial=True)
    assert seen[-1] != "again" and stages.rows[-1][1] == "done before (skipped)"
    # Without keep_partial (a stage that cannot resume) a partial folder is emptied.
    (tmp_path / "4-distilled" / STAMP).unlink()
    stages.run(4, "distilled", inputs, lambda folder: seen.append(sorted(p.name for p in folder.iterdir())))
    assert seen[-1] == [STARTED]


def test_overwrite_keeps_finished_entries_of_the_same_settings(sd3_pipeline, tmp_path):
    """`analyze --overwrite` killed mid-way, then run again with --overwrite: the finished entries are reused."""
    out = tmp_path / "analysis.json"
    full = analyze(sd3_pipeline, out, **SMALL)
    parts = tmp_path / "analysis.json.parts"
    parts.mkdir()
    data = json.loads(out.read_text())
    data["entries"] = data["entries"][:5]
    (parts / "rank-0.json").write_text(json.dumps(data))  # what the killed run had saved
    out.write_text(json.dumps({**data, "metric": {"name": "shapeeval", "options": {}}}))  # an OUT of other settings
    again = analyze(sd3_pipeline, out, overwrite=True, **SMALL)
    assert again.run["this_process"]["reused_entries"] == 5
    assert again.entries == full.entries and again.metric["name"] == "velocity"
    assert not parts.exists()
