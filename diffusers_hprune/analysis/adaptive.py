"""The adaptive analysis: calibration images spent only where a plan's decision depends on them (issue 37).

Every entry first gets ``min_images`` images (whole batches of the calibration, in a random batch order fixed
by the seed); its dP is the mean of the images' dP and its interval the normal-approximation confidence interval
of that mean, with the finite-population correction (the target is the dP the full analysis would measure on
all the calibration images, so the interval closes when every image is in). Then, round after round, a
:class:`StoppingRule` names the entries whose interval could still change what it decides (planning's
``PlanDecisions``: the plans at the ratios asked for); each of them gets one more batch, until none is left or
they have every image. An entry's images, interval and per-image values are kept in the report (the values at
every image too), so a run stopped or started again with other ratios continues from them, and another stopping rule
can be replayed on them (``benchmarks/adaptive_replay.py``).

Rounds are sharded: under several processes each round's entries are split across them, each writes its part
file, and all of them read every part before the next round's decision (the same on every process).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from statistics import NormalDist
from typing import Protocol

from tqdm.auto import tqdm

from diffusers_hprune.architecture import BLOCK
from diffusers_hprune.contributions import AnalysisError, ContributionReport
from diffusers_hprune.metrics import OUTPUT

Key = tuple[int, str]


class StoppingRule(Protocol):
    """What decides when an entry has had images enough (planning implements it: ``PlanDecisions``)."""

    def undecided(self, estimates: Mapping[Key, float], intervals: Mapping[Key, tuple[float, float]]) -> set[Key]:
        """The entries whose dP anywhere in their interval (the others at their estimates) could change the
        decision."""
        ...


def interval(values: list[float], population: int, confidence: float) -> tuple[float, float]:
    """The ``confidence`` interval of the mean of ``population`` values, from the first ``len(values)`` of them.

    Normal approximation, the sample's standard deviation, and the finite-population correction
    ``sqrt((N - n) / (N - 1))``: zero width once every value is in. Unbounded for fewer than 2 values.
    """
    n = len(values)
    mean = math.fsum(values) / n
    if n >= population:
        return mean, mean
    if n < 2:
        return -math.inf, math.inf
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * sd / math.sqrt(n) * math.sqrt((population - n) / (population - 1))
    return mean - half, mean + half


def batch_order(num_batches: int, seed: int) -> list[int]:
    """The order in which an adaptive analysis measures the calibration's batches: random, fixed by ``seed``."""
    order = list(range(num_batches))
    random.Random(seed).shuffle(order)
    return order


class AdaptiveRun:
    """The rounds of an adaptive analysis over a :class:`~.measurement.Measurement`."""

    def __init__(self, measurement, report: ContributionReport, rule: StoppingRule, *, min_images: int,
                 confidence: float, state, checkpoint, sync, progress: bool):
        """``measurement()`` returns the :class:`~.measurement.Measurement` (made when first called: a run with
        nothing left to measure draws nothing); ``checkpoint()`` saves this process's entries (its part file, with
        the run's cost so far) after every batch; ``sync()`` shares the processes' entries between rounds."""
        self.measurement, self.report, self.rule = measurement, report, rule
        self.confidence, self.state, self.checkpoint, self.sync = confidence, state, checkpoint, sync
        images, size = report.calibration_images, int(report.calibration["batch_size"])
        order = batch_order(-(-images // size), int(report.calibration["seeds"][0]))
        # components: the batches of their first images only (a multiple of the batch size)
        self.orders = {True: order, False: [b for b in order if b * size < report.component_images]}
        self.size, self.images = size, images
        self.min_images = min_images
        self.rounds = 0
        self.measured: list[Key] = []
        self.bar = tqdm(desc="adaptive analysis", unit="batch", total=0,
                        disable=not (progress and state.is_main_process))

    def _next_batch(self, key: Key) -> int:
        """The next batch entry ``key`` measures, in its random order; its values end at a batch."""
        n = len(self.report.entries[key]["values"]) if key in self.report.entries else 0
        done = 0
        for batch in self.orders[key[1] == BLOCK]:
            if done == n:
                return batch
            done += min(self.size, self.images - batch * self.size)
        raise AnalysisError(f"Entry block {key[0]} {key[1]} has {n} image values, which do not end at a batch of "
                            f"{self.size}; the analysis file was edited: analyse again with --overwrite.")

    def _final(self, key: Key) -> bool:
        return key in self.report.entries and not self.report.stopped_early(key)

    def todo(self, keys: list[Key]) -> list[Key]:
        """This round's entries: those below ``min_images``, else the rule's undecided ones not yet at every image."""
        entries = self.report.entries
        short = [k for k in keys if k not in entries or (
            not self._final(k) and self.report.images_of(k) < min(self.min_images, self.report.entry_images(k)))]
        if short:
            return short
        estimates = {k: entries[k]["delta"] for k in keys}
        intervals = {k: tuple(entries[k].get("interval", (entries[k]["delta"],) * 2)) for k in keys
                     if not self._final(k)}
        undecided = self.rule.undecided(estimates, intervals) if intervals else set()
        return [k for k in keys if k in undecided and not self._final(k)]

    def add_batch(self, key: Key) -> None:
        """One more batch of images for ``key``; its dP, interval and values updated."""
        batch = self._next_batch(key)
        entry = self.report.entries.get(key, {})
        values = list(entry.get("values", [])) + self.measurement().image_deltas(key, batch)
        delta = math.fsum(values) / len(values)
        population = self.report.entry_images(key)
        low, high = interval(values, population, self.confidence)
        # the values stay at every image too: the evidence a stopping rule can be studied on again (replayed)
        self.report.entries[key] = {"score": self.report.baseline_score - delta, "delta": delta,
                                    "n_images": len(values), "interval": [low, high], "values": values}

    def run(self, keys: list[Key]) -> None:
        """Rounds until no entry is left to measure (the same decision on every process)."""
        while True:
            todo = self.todo(keys)
            if not todo:
                break
            self.rounds += 1
            mine = todo[self.state.process_index :: self.state.num_processes]
            self.bar.total += len(todo)
            self.bar.refresh()
            for key in mine:
                self.add_batch(key)
                if key not in self.measured:
                    self.measured.append(key)
                self.bar.update(self.state.num_processes)
                self.bar.set_postfix_str(f"round {self.rounds}, {len(todo)} entries, block {key[0]} {key[1]}")
                self.checkpoint()
            self.sync()
        self.bar.close()

    def summary(self) -> dict:
        """What the run spent, for ``report.run``."""
        used = sum(self.report.images_of(k) for k in self.report.entries)
        return {"rounds": self.rounds, "confidence": self.confidence, "min_images": self.min_images,
                "images_used": used, "images_full": sum(self.report.entry_images(k) for k in self.report.entries)}


def check_adaptive(metric_def, alignment_metric: str | None, method: str, min_images: int | None,
                   confidence: float) -> None:
    """What an adaptive analysis needs: a metric of images (a mean of per-image scores), no alignment score
    beside it, ablated images from the full model's noise (``cached`` or ``naive``), at least 2 images per entry
    to start and a confidence in (0, 1)."""
    if not 0 < confidence < 1:
        raise AnalysisError(f"The confidence of an adaptive analysis must lie in (0, 1), got {confidence}.")
    if min_images is not None and min_images < 2:
        raise AnalysisError(f"An adaptive analysis needs at least 2 images per entry to start (an interval needs "
                            f"a spread), got --min-images {min_images}.")
    if metric_def.kind == OUTPUT:
        raise AnalysisError(f"An adaptive analysis (--images auto) spends images; the {metric_def.name} metric "
                            "compares predictions, not images, and is cheap already: drop --images auto, or choose "
                            "an image metric (image_fidelity).")
    if alignment_metric is not None:
        raise AnalysisError("An adaptive analysis (--images auto) measures one metric; measure the alignment score "
                            "for bk-sdm (--alignment-metric) in a full analysis of its own.")
    if method == "scratch":
        raise AnalysisError("An adaptive analysis (--images auto) runs with --method cached or naive; scratch "
                            "recomputes the full model per entry and is for verifying a full analysis.")


__all__ = ["AdaptiveRun", "StoppingRule", "batch_order", "check_adaptive", "interval"]
