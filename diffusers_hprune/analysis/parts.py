"""An analysis's files: the entries of a run stopped, of earlier runs and of the other processes, read back and
merged.

Each process writes its finished entries to ``<out>.parts/rank-<r>.json`` as it goes (atomically); a run started
again with the same settings reads them (:func:`resume`), a sharded adaptive analysis reads the others' between
rounds (:func:`sync_parts`), and the main process merges them into ``<out>`` at the end (:func:`merged_result`),
removing the parts once the analysis is complete. Where two files hold the same entry, the one measured on more
images wins (:func:`take_entries`: an adaptive analysis's parts hold entries at different stages).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers_hprune.contributions import AnalysisError, ContributionReport
from diffusers_hprune.metrics import canonical_name


def parts_dir(out: Path) -> Path:
    """The folder of the processes' part files of the analysis ``out``."""
    return out.with_name(out.name + ".parts")


def read_known(report: ContributionReport, out: Path | None, overwrite: bool) -> list[Path]:
    """Merge entries of the same settings from ``out`` and its parts folder into ``report`` (resume).

    Files of other settings (or unreadable ones) are refused, or with ``overwrite`` returned, to be
    replaced: ``--overwrite`` never discards finished entries of the same settings.
    """
    if out is None:
        return []
    stale = []
    sources = ([out] if out.exists() else []) + sorted(parts_dir(out).glob("rank-*.json"))
    for path in sources:
        try:
            other = ContributionReport.load(path)
        except AnalysisError as e:
            if overwrite:
                stale.append(path)
                continue
            raise AnalysisError(f"{e} (Found while resuming; pass --overwrite to start again, replacing it.)") from None
        # A file written before a built-in metric was renamed (fidelity -> velocity) resumes under the new name.
        other.metric = dict(other.metric, name=canonical_name(str(other.metric.get("name", ""))))
        if other.settings() != report.settings():
            if overwrite:
                stale.append(path)
                continue
            differs = [k for k, v in report.settings().items() if other.settings().get(k) != v]
            raise AnalysisError(
                f"{path} holds an analysis with other settings ({', '.join(differs)} differ: another model, metric or "
                "calibration); pass --overwrite to replace it, or choose another --out."
            )
        take_entries(report, other)
        report.similarity.update(other.similarity)
        report.timesteps = report.timesteps or other.timesteps
        if other.baseline_score is not None:
            report.baseline_score = other.baseline_score
        merge_alignment(report, other)
    return stale


def merge_alignment(report: ContributionReport, other: ContributionReport) -> None:
    """Take ``other``'s alignment entries when they were measured with the alignment metric ``report`` asks for."""
    if not report.alignment or not other.alignment or other.alignment.get("metric") != report.alignment["metric"]:
        return
    report.alignment["blocks"].update(other.alignment.get("blocks", {}))
    if other.alignment.get("baseline_score") is not None:
        report.alignment["baseline_score"] = other.alignment["baseline_score"]


def resume(report: ContributionReport, out: Path | None, overwrite: bool, state) -> None:
    """Fill ``report`` with the entries ``out`` and its part files already hold for the same settings."""
    stale = read_known(report, out, overwrite)
    state.wait_for_everyone()
    if state.is_main_process:  # --overwrite: the part files of other settings go; `out` is replaced at the end
        for path in stale:
            if path != out:
                path.unlink(missing_ok=True)
    state.wait_for_everyone()


def merged_result(report: ContributionReport, out: Path, part: Path, state) -> ContributionReport:
    """Every process's part merged into ``out`` (by the main process); the parts go once it is complete."""
    report.save(part)
    state.wait_for_everyone()
    if state.is_main_process:
        merged = merge(report, out)
        merged.save(out)
        if merged.complete:
            shutil.rmtree(parts_dir(out), ignore_errors=True)
    state.wait_for_everyone()
    final = ContributionReport.load(out)
    final.run["this_process"] = report.run
    return final


def merge(report: ContributionReport, out: Path) -> ContributionReport:
    """The main process's report plus every rank's part file; the run costs of this run's ranks are summed."""
    merged = ContributionReport(**{k: getattr(report, k) for k in (
        "family", "num_blocks", "model", "fingerprint", "transformer_config", "metric", "calibration", "pairs",
        "components")})
    merged.baseline_score = report.baseline_score
    merged.entries = dict(report.entries)
    merged.similarity = dict(report.similarity)
    merged.timesteps = report.timesteps
    merged.alignment = {k: (dict(v) if isinstance(v, dict) else v) for k, v in report.alignment.items()}
    totals = {"block_evaluations": 0, "seconds": 0.0}
    processes = int(report.run.get("processes", 1))
    for path in sorted(parts_dir(out).glob("rank-*.json")):
        other = ContributionReport.load(path)
        take_entries(merged, other)
        merged.similarity.update(other.similarity)
        merge_alignment(merged, other)
        if int(path.stem.split("-")[1]) < processes:
            for k in totals:
                totals[k] += other.run.get(k, 0)
    merged.run = {"method": report.run.get("method"), "processes": processes, **totals}
    if "adaptive" in report.run:  # what every process's entries spent
        merged.run["adaptive"] = dict(report.run["adaptive"],
                                      images_used=sum(merged.images_of(k) for k in merged.entries),
                                      images_full=sum(merged.entry_images(k) for k in merged.entries))
    return merged


def sync_parts(report: ContributionReport, part: Path | None, state) -> None:
    """Between two rounds of a sharded adaptive analysis: every process's part (``part`` this one's) read by all
    (the next round's decision is then the same everywhere). Nothing to do on one process."""
    if state.num_processes == 1 or part is None:
        return
    report.save(part)
    state.wait_for_everyone()
    for path in sorted(part.parent.glob("rank-*.json")):
        take_entries(report, ContributionReport.load(path))
    state.wait_for_everyone()  # nobody writes the next round's part before everyone has read this round's


def take_entries(report: ContributionReport, other: ContributionReport) -> None:
    """``other``'s entries into ``report`` where they were measured on at least as many images (an adaptive
    analysis's parts hold the same entry at different stages)."""
    for key, entry in other.entries.items():
        if key not in report.entries or other.images_of(key) >= report.images_of(key):
            report.entries[key] = entry


__all__ = ["merge", "merged_result", "parts_dir", "read_known", "resume", "sync_parts", "take_entries"]
