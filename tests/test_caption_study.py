"""The caption-mitigation study (docs/memorization.md#caption-mitigations): src/replication/study.py's
intervals, the ablation arms of conf/ablation/, experiments/caption_mitigations/aggregate.py on hand-made and
tiny trained runs, and notebooks/caption_mitigations.ipynb on a tiny multirun."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from src.replication import study as shared
from src.train import train
from tests.conftest import ROOT, compose_config, load_script, tiny_text2img_overrides
from tests.test_notebooks import run_notebook

AGGREGATE_PATH = ROOT / "experiments" / "caption_mitigations" / "aggregate.py"
ARMS = sorted(p.stem for p in (ROOT / "conf" / "ablation").glob("*.yaml"))


aggregate = load_script(AGGREGATE_PATH, "caption_mitigations_aggregate")


# ---- intervals --------------------------------------------------------------------------------------------------------
def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.1, 30), rng.normal(0.5, 0.1, 3000)
    for values in (small, large):
        low, high = shared.bootstrap_interval(values, shared.mean)
        assert low < values.mean() < high
    width = [np.subtract(*shared.bootstrap_interval(v, shared.mean)[::-1]) for v in (small, large)]
    assert width[1] < width[0] / 5  # ~sqrt(100) = 10x narrower
    seeded = shared.bootstrap_interval(small, shared.mean)
    assert shared.bootstrap_interval(small, shared.mean) == seeded
    assert shared.bootstrap_interval([0.2] * 10, shared.percentile_95) == pytest.approx((0.2, 0.2))
    assert np.isnan(shared.bootstrap_interval([], shared.mean)[0])


def test_bootstrap_difference_sees_a_planted_gap_and_no_gap():
    rng = np.random.default_rng(1)
    a, b, c = rng.normal(0.9, 0.05, 100), rng.normal(0.7, 0.05, 100), rng.normal(0.9, 0.05, 100)
    low, high = shared.bootstrap_difference(a, b, shared.mean)
    assert 0.15 < low < 0.2 < high < 0.25
    low, high = shared.bootstrap_difference(a, c, shared.mean)
    assert low < 0 < high
    assert shared.share_above(0.5)(np.array([[0.4, 0.6, 0.7, 0.5]])) == pytest.approx([0.5])  # strictly above


# ---- the study's configs ---------------------------------------------------------------------------------------------
def test_every_ablation_arm_composes_to_its_conditioning_and_mitigation(tmp_path):
    assert ARMS == sorted(
        ["nolevel", "classlevel", "instancelevel_random", "none", "mc", "gn", "rc", "rt", "cwr"]
    )
    sweep = yaml.safe_load((ROOT / "conf" / "sweep" / "t2i_mitigations.yaml").read_text())
    assert sorted(sweep["hydra"]["sweeper"]["params"]["+ablation"].split(",")) == [
        a for a in ARMS if a != "instancelevel_random"
    ]
    for arm in ARMS:
        cfg = compose_config("train.yaml", ["experiment=t2i_mitigations", f"+ablation={arm}"], tmp_path)
        levels = ("nolevel", "classlevel", "instancelevel_random")
        assert cfg.data.conditioning == (arm if arm in levels else "instancelevel_blip")
        assert cfg.mitigation.name == (arm if arm not in levels else "none")
        assert cfg.model.train_mitigation == cfg.mitigation and cfg.data.mitigation == cfg.mitigation
        inference = [m.name for m in cfg.callbacks.replication.inference_mitigations]
        assert inference == (["gni", "rt", "cwr", "rna"] if arm == "none" else [])
        assert (cfg.data.subset_size, cfg.data.control_size, cfg.trainer.max_steps) == (20, 20, 800)


# ---- hand-made runs ----------------------------------------------------------------------------------------------------
def fake_run(
    run_dir,
    data,
    conditioning="instancelevel_blip",
    mitigation="none",
    sims=(0.9, 0.5),
    inference=None,
    threshold=0.9,
    fid=None,
    seed=None,
):
    """A run folder as ReplicationAnalysis leaves it: config, summary, and per set a report and matches.csv (most
    replicated first; generation i matched to face_{i % 3}.png) with 8x8 images. inference: {name: sims}."""
    data.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / f"face_{i}.png")
    sets = {
        "train": ("final", sims),
        **{f"inference_{n}": (f"final_{n}", s) for n, s in (inference or {}).items()},
    }
    for report_dir, (samples_dir, values) in sets.items():
        out, samples = run_dir / "replication" / report_dir, run_dir / "samples" / samples_dir
        out.mkdir(parents=True), samples.mkdir(parents=True)
        stats = {"fid": fid} if fid is not None else {}
        report = {
            "threshold": threshold,
            "extractor": "pixels32",
            "stats": stats,
            "folders": {"train": str(data)},
        }
        (out / "report.json").write_text(json.dumps(report))
        with open(out / "matches.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["generated", "prompt", "match_1", "sim_1"])
            for i, sim in sorted(enumerate(values), key=lambda t: -t[1]):
                writer.writerow([f"{i:06d}.png", "a prompt", f"face_{i % 3}.png", sim])
                Image.new("RGB", (8, 8), (0, 20 * i, 0)).save(samples / f"{i:06d}.png")
    summary = {
        "num_train": 3,
        "num_control": 3,
        "num_generated": len(sims),
        "step": 5,
        "inference_mitigations": [{"name": n} for n in (inference or {})],
        "metrics": {"replication/control/sim_95pc": 0.42},
    }
    (run_dir / "replication" / "summary.json").write_text(json.dumps(summary))
    config = {"data": {"conditioning": conditioning}, "mitigation": {"name": mitigation}}
    if seed is not None:
        config["seed"] = seed
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.fixture
def hand_made(tmp_path):
    """A multirun of four arms: no captions, instance-level (with two inference mitigations), mc and gn."""
    rng = np.random.default_rng(0)
    high, low = rng.normal(0.95, 0.02, 60).clip(max=1), rng.normal(0.6, 0.05, 60)
    multirun, data = tmp_path / "multi", tmp_path / "data"
    fake_run(multirun / "3", data, mitigation="gn", sims=rng.normal(0.95, 0.02, 60).clip(max=1))
    fake_run(multirun / "0", data, conditioning="nolevel", sims=low)
    fake_run(multirun / "1", data, sims=high, inference={"gni": low, "rna": high}, fid=12.5)
    fake_run(multirun / "2", data, mitigation="mc", sims=low)
    return {"multirun": multirun, "high": high, "low": low}


def test_load_study_orders_the_arms_as_the_paper_and_recomputes_each_figure(hand_made):
    arms = aggregate.load_study([hand_made["multirun"]])
    assert [(a.kind, a.name) for a in arms] == [
        ("conditioning", "nolevel"),
        ("conditioning", "instancelevel_blip"),
        ("train", "none"),
        ("train", "mc"),
        ("train", "gn"),
        ("inference", "none"),
        ("inference", "gni"),
        ("inference", "rna"),
    ]
    reference, gni = arms[1], arms[6]
    high = hand_made["high"]
    assert reference.row["sim_95pc"] == pytest.approx(np.percentile(high, 95))
    assert reference.row["sim_mean"] == pytest.approx(high.mean())
    assert reference.row["share_gt_thr"] == pytest.approx((high > 0.9).mean())
    assert reference.row["sim_95pc_low"] <= reference.row["sim_95pc"] <= reference.row["sim_95pc_high"]
    assert (reference.row["fid"], reference.row["control_sim_95pc"], reference.row["n"]) == (12.5, 0.42, 60)
    assert "source_top1" not in reference.row  # no datamodule to rebuild the prompts' sources from
    assert gni.row["inference_mitigation"] == "gni" and gni.row["train_mitigation"] == "none"
    assert gni.row["sim_mean"] == pytest.approx(hand_made["low"].mean())
    assert gni.generated_dir.name == "final_gni"
    assert len(aggregate.unique_arms(arms)) == 6  # the reference once


def test_check_claims_names_what_differs_and_what_does_not(hand_made):
    findings = aggregate.check_claims(aggregate.load_study([hand_made["multirun"]]))
    text = "\n".join(findings)
    assert "instance-level vs nolevel: higher: sim_95pc" in text
    assert "train-time mc vs none: lower: sim_95pc" in text
    assert "train-time gn vs none: not different: sim_95pc" in text
    assert "inference-time gni vs none: lower: share_gt_thr" in text
    assert "inference-time rna vs none: not different: sim_95pc" in text
    assert aggregate.check_claims([]) == [
        "no instance-level run without mitigation (the reference): nothing to compare"
    ]


def test_several_training_seeds_are_compared_seed_by_seed_and_summarised(tmp_path):
    rng = np.random.default_rng(1)
    multirun, data = tmp_path / "seeds", tmp_path / "data"
    for seed in (0, 1):
        copies = rng.normal(0.95, 0.02, 60).clip(max=1)
        fake_run(multirun / f"{seed}_none", data, sims=copies, seed=seed)
        fake_run(multirun / f"{seed}_mc", data, mitigation="mc", sims=rng.normal(0.6, 0.05, 60), seed=seed)
        # gn lowers copying with seed 0 only
        gn = rng.normal(0.6, 0.05, 60) if seed == 0 else rng.normal(0.95, 0.02, 60).clip(max=1)
        fake_run(multirun / f"{seed}_gn", data, mitigation="gn", sims=gn, seed=seed)
    arms = aggregate.load_study([multirun])
    assert [a.name for a in arms if a.kind == "train"] == [
        "none [seed 0]",
        "none [seed 1]",
        "mc [seed 0]",
        "mc [seed 1]",
        "gn [seed 0]",
        "gn [seed 1]",
    ]
    assert {a.row["seed"] for a in arms} == {0, 1} and arms[0].base == "instancelevel_blip"

    findings = "\n".join(aggregate.check_claims(arms))
    assert "seed 0: train-time gn vs none: lower: share_gt_thr" in findings
    assert "seed 1: train-time gn vs none: not different: share_gt_thr" in findings
    agreement = aggregate.seed_agreement(arms)
    line = next(x for x in agreement if x.startswith("train-time mc vs none, share_gt_thr:"))
    assert "lower in 2 of 2 seeds (seed 0: -" in line and "seed 1: -" in line
    gn_line = next(x for x in agreement if x.startswith("train-time gn vs none, share_gt_thr:"))
    assert "lower in 1" in gn_line and "not different in 1" in gn_line and "of 2 seeds" in gn_line

    fig = aggregate.draw_study(arms)
    assert "of the arm's seed" in fig.texts[0].get_text()
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert len(dashed) == len(arms)  # a tick per bar at its own seed's reference
    files = aggregate.write_study(arms, tmp_path / "out")
    assert "## Across training seeds" in files["study.md"].read_text()
    assert aggregate.seed_agreement([a for a in arms if a.seed == 0]) == []  # one seed: nothing to summarise


def test_arm_labels_carry_the_options():
    assert aggregate.arm_label({"name": "rc", "p": 0.5}) == "rc (p=0.5)"
    assert (
        aggregate.arm_label({"name": "gni", "lam": 0.1, "noise_uncond": True})
        == "gni (lam=0.1, noise_uncond=True)"
    )
    assert aggregate.arm_label({"name": "mc"}) == "mc"


def test_source_hits_follow_the_generation_index():
    matches = [
        {"generated": "000002.png", "match_1": "b.png"},
        {"generated": "000000.png", "match_1": "x.png"},
    ]
    assert aggregate.source_hits(matches, ["a.png", "q.png", "b.png"]).tolist() == [True, False]
    assert aggregate.source_hits(matches, [None, None, None]) is None  # class-level prompts have no source
    assert aggregate.source_hits(matches, None) is None


def test_write_study_and_bad_runs(hand_made, tmp_path):
    arms = aggregate.load_study([hand_made["multirun"]])
    files = aggregate.write_study(arms, tmp_path / "out")
    assert all(path.stat().st_size > 0 for path in files.values())
    text = files["study.md"].read_text()
    assert text.count("| arm |") == 3 and "## Findings" in text
    with open(files["study.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(arms) and rows[0]["arm"] == "nolevel"
    fig, unreadable = aggregate.draw_study_gallery(aggregate.unique_arms(arms))
    assert unreadable == 0
    assert {t.get_text() for ax in aggregate.draw_study(arms).axes for t in [ax.title]} >= {"FID"}

    (hand_made["multirun"] / "2" / "replication" / "train" / "matches.csv").unlink()
    with pytest.raises(ValueError, match=r"multi/2: replication/train/report.json or matches.csv is missing"):
        aggregate.load_study([hand_made["multirun"]])
    with pytest.raises(FileNotFoundError, match="no run under .* holds replication/summary.json"):
        aggregate.load_study([tmp_path / "out"])


# ---- tiny trained runs ------------------------------------------------------------------------------------------------
STUDY_ARMS = ("nolevel", "none", "mc")


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir):
    """The fewest tiny arms of experiment=t2i_mitigations that fill each group of the study (conditioning,
    train-time, inference-time), where the notebook looks for studies:
    <root>/logs/train/multiruns/t2i_mitigations_test/<job>; the `none` arm also generates with gni."""
    root = tmp_path_factory.mktemp("caption_study")
    multirun = root / "logs" / "train" / "multiruns" / "t2i_mitigations_test"
    for job, arm in enumerate(STUDY_ARMS):
        overrides = ["experiment=t2i_mitigations", f"+ablation={arm}", *tiny_text2img_overrides(data_dir)]
        if arm == "none":
            # two settings of one mitigation: the second needs its own label (folder tag)
            overrides.append(
                "callbacks.replication.inference_mitigations="
                "[{name: gni, lam: 0.1}, {name: gni, label: gni_strong, lam: 0.5}]"
            )
        train(compose_config("train.yaml", overrides, multirun / str(job)))
    return {"root": root, "multirun": multirun}


@pytest.mark.slow
def test_aggregate_of_tiny_trained_arms(study, tmp_path, capsys):
    arms = aggregate.main([str(study["multirun"]), "--out", str(tmp_path)])
    assert [(a.kind, a.name) for a in arms] == [
        ("conditioning", "nolevel"),
        ("conditioning", "instancelevel_blip"),
        ("train", "none"),
        ("train", "mc"),
        ("inference", "none"),
        ("inference", "gni (lam=0.1)"),
        ("inference", "gni (lam=0.5)"),
    ]
    assert [a.generated_dir.name for a in arms[-2:]] == ["final_gni", "final_gni_strong"]
    for arm in arms:
        summary = json.loads((arm.run_dir / "replication" / "summary.json").read_text())
        folder = arm.generated_dir.name.removeprefix("final_")
        tag = "train" if arm.kind != "inference" or arm.method == "none" else f"inference_{folder}"
        assert arm.row["sim_95pc"] == pytest.approx(
            summary["metrics"][f"replication/{tag}/sim_95pc"], abs=1e-5
        )
        assert arm.row["n"] == 6
        # the prompts' source images are rebuilt for instance-level arms only
        assert ("source_top1" in arm.row) == (arm.row["conditioning"] == "instancelevel_blip")
    reference = arms[1]
    hits = [r["match_1"] for r in reference.matches]
    prompts = [r["prompt"] for r in reference.matches]
    captions = json.loads((reference.train_root.parent / "captions.json").read_text())
    expected = np.mean([captions[path][0] == prompt for path, prompt in zip(hits, prompts, strict=True)])
    assert reference.row["source_top1"] == pytest.approx(expected)  # the top-1 image is the prompt's own
    printed = capsys.readouterr().out
    assert "## Findings" in printed and "could not be read" not in printed


@pytest.mark.slow
def test_notebook_shows_the_newest_caption_study(study, monkeypatch):
    # STUDY_DIR empty: the notebook finds the newest study under COPYSCOPE_ROOT
    outputs, text, figures = run_notebook(
        "caption_mitigations.ipynb", monkeypatch, STUDY_DIR="", COPYSCOPE_ROOT=study["root"]
    )
    assert f"Study: {study['multirun'].resolve()}" in text and "could not be read" not in text
    assert len(figures) == 2, f"got {len(figures)} figures"  # the statistics per arm, the gallery
    tables = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert sum("sim_95pc" in t for t in tables) == 3  # one table per group: conditioning, train, inference
    galleries = [t for t in tables if "similarity" in t and "prompt" in t]
    assert len(galleries) == 5  # each arm once: the reference, mc, nolevel, gni, gni_strong
    assert "fed to mc" in text and sum("caption_0" in t for t in tables) == 3  # what each run was fed
    assert "- train-time mc vs none:" in text  # the findings
