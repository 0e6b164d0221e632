"""`hprune analyze --synthetic`, `hprune plan` and `hprune report`: the files, the printed summary, bad input."""

from __future__ import annotations

import json
import re

import pytest

from diffusers_hprune import PrunePlan
from diffusers_hprune.analysis import synthetic_report
from diffusers_hprune.architecture.inventory import inspect_transformer
from diffusers_hprune.cli import main
from diffusers_hprune.commands.options import parse_bytes
from diffusers_hprune.contributions import ContributionReport


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "analysis.json"
    assert main(["analyze", "sd3.5-large-turbo", "--synthetic", "--out", str(path)]) == 0
    return path


@pytest.mark.parametrize("config,blocks", [("sd3.5-large-turbo", 38), ("flux.1-schnell", 57)])
@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_real_configs_plan_at_20_and_30_percent(config, blocks, ratio, tmp_path, capsys):
    """Planning on the public configs with a synthetic analysis (no weights): ratio reached, bytes printed."""
    report = synthetic_report(config)
    assert report.num_blocks == blocks and report.complete and report.metric["name"] == "synthetic"
    report.save(tmp_path / "a.json")
    assert main(["plan", str(tmp_path / "a.json"), "--ratio", str(ratio), "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    plan = PrunePlan.load(tmp_path / "p.json")
    inventory = inspect_transformer(dict(report.transformer_config, prune_plan=plan.to_dict()))
    assert inventory.removed_fraction >= ratio
    assert plan.metadata["achieved_ratio"] == pytest.approx(inventory.removed_fraction, abs=1e-6)
    assert f"({inventory.removed_fraction:.2%})" in out and "GB" in out
    if ratio > 0.25:
        assert plan.removed_components  # past r_thres the components go too


def test_plan_memory_nf4_and_strategies(synthetic, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(synthetic), "--memory", "3.2GB", "--weight-dtype", "nf4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "at nf4" in printed and PrunePlan.load(out).metadata["memory_bytes"] == 3_200_000_000
    plans = {}
    for strategy in ("hierarchical", "bk-sdm", "koala", "last"):
        path = tmp_path / f"{strategy}.json"
        assert main(["plan", str(synthetic), "--ratio", "0.2", "--strategy", strategy, "--out", str(path)]) == 0
        plans[strategy] = PrunePlan.load(path)
        assert plans[strategy].metadata["strategy"] == strategy
    assert plans["last"].removed_blocks == list(range(38 - len(plans["last"].removed_blocks), 38))
    report = ContributionReport.load(synthetic)
    by_similarity = sorted(range(38), key=lambda i: (-report.similarity[i], -i))
    assert plans["koala"].removed_blocks == sorted(by_similarity[: len(plans["koala"].removed_blocks)])
    by_alignment = sorted(range(38), key=lambda i: (report.alignment_contributions()[i], -i))
    assert plans["bk-sdm"].removed_blocks == sorted(by_alignment[: len(plans["bk-sdm"].removed_blocks)])
    for plan in plans.values():  # whole-block plans land within 2 points of the target
        assert abs(plan.metadata["achieved_ratio"] - 0.2) <= 0.02


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1.5"], r"must lie in \(0, 1\)"),
        (["--ratio", "0"], r"must lie in \(0, 1\)"),
        (["--memory", "1MB", "--weight-dtype", "nf4"], "No plan fits"),
    ],
)
def test_plan_bad_targets(synthetic, tmp_path, capsys, args, message):
    out = tmp_path / "plan.json"
    out.write_text("old")
    assert main(["plan", str(synthetic), *args, "--out", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert out.read_text() == "old"


def test_plan_bad_analysis_files(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "diffusers-hprune/analysis", "format_version": 1, "family": "sd3"')
    assert main(["plan", str(corrupt), "--ratio", "0.2", "--out", str(tmp_path / "p.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    incomplete = synthetic_report("sd3.5-large-turbo")
    del incomplete.entries[(3, "ff")]
    incomplete.save(tmp_path / "inc.json")
    assert main(["plan", str(tmp_path / "inc.json"), "--ratio", "0.2", "--out", str(tmp_path / "p.json")]) == 2
    assert "incomplete" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
    with pytest.raises(SystemExit):
        main(["plan", str(tmp_path / "inc.json"), "--memory", "four gigs", "--out", "x"])


def test_parse_bytes():
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("3.5GiB") == int(3.5 * 2**30)
    assert parse_bytes("800 MB") == 800 * 10**6
    assert parse_bytes("123") == 123
    assert parse_bytes("2G") == 2 * 10**9


def test_report_figures_and_table(synthetic, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(synthetic), "--ratio", "0.3", "--out", str(plan_path)]) == 0
    capsys.readouterr()
    out = tmp_path / "report"
    assert main(["report", str(synthetic), "--plan", str(plan_path), "--out", str(out)]) == 0
    for name in ("blocks.png", "components.png", "similarity.png", "table.txt"):
        assert (out / name).stat().st_size > 0
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.txt").read_text()
    plan = PrunePlan.load(plan_path)
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip() and line.split()[0].isdigit()}
    assert len(rows) == 38
    removed = plan.removed_blocks[0]
    assert f" {ContributionReport.load(synthetic).entries[(removed, 'block')]['delta']:.4g}*" in rows[str(removed)]
    kept = next(i for i in range(38) if i not in plan.removed_blocks and i not in plan.removed_components)
    assert "*" not in rows[str(kept)]
    assert table == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"


def test_report_of_pairs(tmp_path):
    from diffusers_hprune.planning.report import write_report

    report = synthetic_report("flux.1-schnell", pairs=True)
    paths = write_report(report, tmp_path)
    assert tmp_path / "pairs.png" in paths
    data = json.loads(json.dumps(report.to_dict()))
    assert ContributionReport.from_dict(data).entries == report.entries


def test_report_refuses_a_plan_of_another_family(synthetic, tmp_path, capsys):
    plan = PrunePlan(removed_blocks=[3], family="flux", num_blocks=57)
    plan.save(tmp_path / "flux-plan.json")
    assert main(["report", str(synthetic), "--plan", str(tmp_path / "flux-plan.json"), "--out", str(tmp_path / "r")]) == 2
    assert "made for the 'flux' family" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
