"""The DDPM memorization study (docs/memorization.md#ddpm-on-nested-subsets):
experiments/ddpm_memorization/aggregate.py on hand-made and tiny trained runs, its trend check, and
notebooks/ddpm_memorization.ipynb on a tiny multirun."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from src.train import train
from tests.conftest import ROOT, compose_config, load_script, tiny_diffusion_overrides
from tests.test_notebooks import run_notebook

AGGREGATE_PATH = ROOT / "experiments" / "ddpm_memorization" / "aggregate.py"
SUBSET_SIZES = (8, 4)  # job 0 trains on 8 faces, job 1 on 4: the study must sort them by size


aggregate = load_script(AGGREGATE_PATH, "ddpm_memorization_aggregate")


def trend_row(size, train_95, train_thr, control_95=0.1, control_thr=0.0) -> dict:
    return {
        "subset_size": size,
        "train_sim_95pc": train_95,
        "train_sim_gt_thr": train_thr,
        "control_sim_95pc": control_95,
        "control_sim_gt_thr": control_thr,
    }


# ---- check_trend on hand-made rows -------------------------------------------------------------------------------
def test_check_trend_reports_a_memorization_trend():
    rows = [trend_row(80, 0.6, 0.0), trend_row(10, 0.95, 0.4), trend_row(30, 0.8, 0.1)]  # unsorted on purpose
    assert aggregate.check_trend(rows) == [
        "sim_95pc vs train decreases monotonically with subset size n: 0.9500 (n=10), 0.8000 (n=30), 0.6000 (n=80)",
        "sim_gt_thr vs train decreases monotonically with subset size n: 0.4000 (n=10), 0.1000 (n=30), 0.0000 (n=80)",
        "smallest subset (10 images): sim_95pc vs train 0.9500 exceeds vs control 0.1000",
        "smallest subset (10 images): sim_gt_thr vs train 0.4000 exceeds vs control 0.0000",
    ]


def test_check_trend_reports_rises_ties_and_no_excess():
    rows = [trend_row(10, 0.5, 0.0, control_95=0.5), trend_row(30, 0.7, 0.0), trend_row(80, 0.6, 0.0)]
    findings = aggregate.check_trend(rows)
    assert findings[0].startswith("sim_95pc vs train does NOT decrease monotonically")
    assert findings[1].startswith("sim_gt_thr vs train does not increase, but has ties")
    assert "sim_95pc vs train 0.5000 does NOT exceed vs control 0.5000" in findings[2]  # equal is not above


def test_check_trend_averages_runs_of_one_size_and_handles_missing_control():
    # two seeds at 10 images (0.9 and 0.5, mean 0.7) against 0.8 at 30: replication rises on average
    rows = [trend_row(10, 0.9, 0.2, None, None), trend_row(10, 0.5, 0.2, None, None), trend_row(30, 0.8, 0.1)]
    findings = aggregate.check_trend(rows)
    assert (
        findings[0]
        == "sim_95pc vs train does NOT decrease monotonically with subset size n: 0.7000 (n=10), 0.8000 (n=30)"
    )
    assert findings[2] == "smallest subset (10 images): no control set, sim_95pc not compared"
    assert aggregate.check_trend([trend_row(10, 0.9, 0.2)])[0] == (
        "sim_95pc vs train: measured for 1 subset size(s), no trend to check"
    )


def test_markdown_table_formats_missing_values_as_dashes():
    table = aggregate.markdown_table(
        [{"run": "m/0", "subset_size": 10, "train_sim_95pc": 0.123456, "bg_95pc": None}]
    )
    header, rule, row = table.splitlines()
    assert header.startswith("| run | subset_size | control_size |") and rule.count("---") == len(
        aggregate.COLUMNS
    )
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[aggregate.COLUMNS.index("train_sim_95pc")] == "0.1235"
    assert cells[aggregate.COLUMNS.index("bg_95pc")] == "-" and cells[1] == "10"


# ---- reading a hand-made run folder -------------------------------------------------------------------------------
def fake_run(run_dir, data, train_sims, control_sims=None, subset_size=4, threshold=0.5):
    """A run folder in the layout of ReplicationAnalysis: images, matches.csv, report.json, summary.json, ..."""
    (run_dir / "samples" / "final").mkdir(parents=True)
    data.mkdir(exist_ok=True)
    for i in range(subset_size):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(data / f"face_{i}.png")
    stats = {"sim_mean": 0.1, "sim_std": 0.0, "sim_95pc": 0.2, "sim_gt_thr": 0.25, "bg_95pc": 0.3}
    metrics = {f"replication/train/{k}": v for k, v in stats.items()}
    sets = {"train": train_sims}
    if control_sims is not None:
        sets["control"] = control_sims
        metrics.update({f"replication/control/{k}": v / 2 for k, v in stats.items()})
    for name, sims in sets.items():
        out = run_dir / "replication" / name
        out.mkdir(parents=True)
        (out / "report.json").write_text(json.dumps({"threshold": threshold, "extractor": "pixels32"}))
        with open(out / "matches.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["generated", "match_1", "sim_1"])
            for i, sim in sorted(enumerate(sims), key=lambda t: -t[1]):
                writer.writerow([f"{i:06d}.png", f"face_{i % subset_size}.png", sim])
    for i in range(len(train_sims)):
        Image.new("RGB", (8, 8), (0, 20 * i, 0)).save(run_dir / "samples" / "final" / f"{i:06d}.png")
    summary = {
        "num_train": subset_size,
        "num_control": 2 if control_sims else 0,
        "num_generated": len(train_sims),
        "step": 7,
        "metrics": metrics,
    }
    (run_dir / "replication" / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.json").write_text(
        json.dumps({"replication/train/sim_95pc": 0.999, "train/loss": 0.1})
    )
    config = {"data": {"subset_size": subset_size}, "trainer": {"max_steps": 9}}
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "subset_index.json").write_text(json.dumps({"root": str(data), "num_files": subset_size}))
    return run_dir


def test_load_run_reads_the_summary_before_metrics_json(tmp_path):
    run = aggregate.load_run(fake_run(tmp_path / "multi" / "3", tmp_path / "data", [0.9, 0.1], [0.2, 0.3]))
    assert run.row == {
        "run": "multi/3",
        "subset_size": 4,
        "control_size": 2,
        "steps": 7,
        "num_generated": 2,
        "extractor": "pixels32",
        "threshold": 0.5,
        "train_sim_mean": 0.1,
        "train_sim_95pc": 0.2,
        "train_sim_gt_thr": 0.25,
        "control_sim_mean": 0.05,
        "control_sim_95pc": 0.1,
        "control_sim_gt_thr": 0.125,
        "bg_95pc": 0.3,
    }
    np.testing.assert_array_equal(run.top1("train"), [0.9, 0.1])  # most replicated first, as matches.csv
    np.testing.assert_array_equal(run.top1("control"), [0.3, 0.2])
    assert aggregate.panel_title(2, run) == "(c) all points (4)"  # the subset takes the whole folder


def test_a_run_without_control_or_statistics(tmp_path):
    run_dir = fake_run(tmp_path / "run", tmp_path / "data", [0.9, 0.1])
    run = aggregate.load_run(run_dir)
    assert run.top1("control") is None and run.row["control_sim_95pc"] is None
    assert aggregate.check_trend([run.row])[2].endswith("no control set, sim_95pc not compared")
    (run_dir / "replication" / "summary.json").write_text(json.dumps({"metrics": {}}))
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"replication/train/sim_mean.*did not finish"):
        aggregate.load_run(run_dir)
    with pytest.raises(FileNotFoundError, match="no run under .* holds replication/summary.json"):
        aggregate.find_runs([tmp_path / "data"])


def test_study_histograms_are_densities_with_bins_of_0005(tmp_path):
    sims = [0.9001, 0.9002, 0.3001, -0.2]  # -0.2 is counted in the first bin
    run = aggregate.load_run(
        fake_run(tmp_path / "run", tmp_path / "data", sims, [0.1001, 0.1002, 0.1003, 0.1004])
    )
    fig = aggregate.draw_study([run])
    ax = fig.axes[0]
    bars = {}
    for patch in ax.patches:
        bars.setdefault(patch.get_facecolor()[:3], []).append(patch)
    assert sorted(len(b) for b in bars.values()) == [200, 200]
    for patches in bars.values():
        assert all(p.get_width() == pytest.approx(0.005) for p in patches)
        assert sum(p.get_height() * p.get_width() for p in patches) == pytest.approx(1.0)
    # the train histogram (red): 0.9001 and 0.9002 lie in bin 180, 0.3001 in bin 60, -0.2 in bin 0
    red = next(b for b in bars.values() if b[180].get_height() > 0)
    heights = [p.get_height() for p in red]
    assert heights[180] == pytest.approx(2 / (4 * 0.005))
    assert heights[60] == pytest.approx(1 / (4 * 0.005)) and heights[0] == pytest.approx(1 / (4 * 0.005))
    assert sum(h > 0 for h in heights) == 3
    assert [line.get_xdata()[0] for line in ax.lines] == [0.5]  # the threshold


def test_study_gallery_reads_generations_and_training_images(tmp_path):
    runs = [
        aggregate.load_run(fake_run(tmp_path / f"multi/{i}", tmp_path / f"data{i}", [0.9, 0.8, 0.7]))
        for i in range(2)
    ]
    fig, unreadable = aggregate.draw_study_gallery(runs)
    titles = [text.get_text() for text in fig.axes[0].texts]
    assert (
        unreadable == 0 and len(titles) == 2 * 2 * 3
    )  # 2 runs x 3 pairs (fewer than 4 generations), all titled
    assert titles[1] == "train 0.900"
    assert [label.get_text() for label in fig.axes[0].get_yticklabels()] == ["4 images", "4 images"]
    (tmp_path / "data0" / "face_0.png").unlink()
    assert aggregate.draw_study_gallery(runs)[1] == 1


# ---- tiny trained runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir, tiny_run):
    """A fake multirun of tiny DDPM runs (subset sizes `SUBSET_SIZES`) where the notebook looks for studies:
    <root>/logs/train/multiruns/ddpm_quickstart_test/<job>, plus a newer multirun of another kind. Job 0 is the
    session's tiny ddpm_quickstart run (8 faces), copied; job 1 trains on 4."""
    root = tmp_path_factory.mktemp("ddpm_study")
    multirun = root / "logs" / "train" / "multiruns" / "ddpm_quickstart_test"
    shutil.copytree(
        tiny_run("ddpm_quickstart").run_dir, multirun / "0", ignore=shutil.ignore_patterns("*.ckpt")
    )
    overrides = [
        "experiment=ddpm_quickstart",
        *tiny_diffusion_overrides(data_dir, subset_size=SUBSET_SIZES[1]),
    ]
    train(compose_config("train.yaml", overrides, multirun / "1"))
    other = root / "logs" / "train" / "multiruns" / "csd_newer" / "0"
    other.mkdir(parents=True)
    (other / "metrics.json").write_text("{}")  # no replication: the notebook must skip it
    return {"root": root, "multirun": multirun}


@pytest.mark.slow
def test_aggregate_writes_the_study_of_a_multirun(study, tmp_path, capsys):
    out = tmp_path / "out"
    runs = aggregate.main([str(study["multirun"]), "--out", str(out)])
    assert [r.row["subset_size"] for r in runs] == sorted(SUBSET_SIZES)
    for name in ("study.png", "study_gallery.png", "study.csv", "study.md"):
        assert (out / name).stat().st_size > 0, name

    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["subset_size"]) for r in rows] == [4, 8]
    for row in rows:
        run_dir = study["multirun"] / str(SUBSET_SIZES.index(int(row["subset_size"])))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        report = json.loads((run_dir / "replication" / "train" / "report.json").read_text())
        assert (row["control_size"], row["steps"], row["num_generated"]) == ("8", "2", "6")
        assert float(row["threshold"]) == report["threshold"] == 0.9  # the quickstart's pixel threshold
        for column in ("train_sim_mean", "train_sim_95pc", "train_sim_gt_thr", "control_sim_95pc"):
            assert float(row[column]) == pytest.approx(
                metrics[f"replication/{column.replace('_', '/', 1)}"], abs=1e-6
            )
        assert float(row["bg_95pc"]) == pytest.approx(metrics["replication/train/bg_95pc"], abs=1e-6)
        # recomputed from the run's own report
        with open(run_dir / "replication" / "train" / "matches.csv") as f:
            top1 = [float(r["sim_1"]) for r in csv.DictReader(f)]
        assert float(row["train_sim_mean"]) == pytest.approx(np.mean(top1), abs=1e-5)

    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ddpm_quickstart_test/")]
    assert len(table) == 2 and table[0].split("|")[2].strip() == "4"
    assert "- sim_95pc vs train" in printed and "smallest subset (4 images)" in printed
    assert "could not be read" not in printed  # every gallery image was found
    assert "## Findings" in (out / "study.md").read_text()


@pytest.mark.slow
def test_notebook_finds_and_shows_the_newest_ddpm_study(study, monkeypatch):
    # STUDY_DIR empty: the notebook finds the newest study under COPYSCOPE_ROOT
    outputs, text, figures = run_notebook(
        "ddpm_memorization.ipynb", monkeypatch, STUDY_DIR="", COPYSCOPE_ROOT=study["root"]
    )
    assert f"Study: {study['multirun'].resolve()}" in text
    assert "smallest subset (4 images)" in text and "could not be read" not in text
    # the side-by-side histograms, one nearest-match gallery per subset size, the sample grids
    assert len(figures) == 1 + len(SUBSET_SIZES) + 1, f"got {len(figures)} figures"
    tables = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("train_sim_95pc" in t["data"]["text/html"] for t in tables), "no study table was shown"
