"""`python -m src.detect` on tiny trained runs: every detector scores every prompt against the measured ground
truth, on the from-scratch text-to-image model and on the tiny Stable Diffusion directory; bad input is refused
with what applies."""

import csv
import json

import pytest

from src.detect import detect
from src.detection.run import check_detectors, detector_options
from src.train import train
from tests.conftest import ROOT, compose_config, load_script, tiny_text2img_overrides

TINY_DETECT = [
    "device=cpu",
    "bootstrap=10",
    "batch_size=8",
    "options.truth.generations=2",
    "options.truth.steps=2",
    "options.noise_norm.steps=3",
    "options.noise_norm.generations=2",
    "options.attention_entropy.steps=2",
    "options.score_anisotropy.steps=4",
    "options.generation_similarity.generations=2",
    "options.generation_similarity.steps=2",
]


@pytest.mark.slow
def test_every_detector_scores_every_prompt_of_a_tiny_text_to_image_run(tiny_run, tmp_path):
    run = tiny_run("t2i_quickstart").run_dir
    out = detect(compose_config("detect.yaml", [f"ckpt_path={run}", *TINY_DETECT], tmp_path / "a"))
    with (tmp_path / "a" / "scores.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == out["summary"]["num_prompts"] == 8  # the training prompts (no held-out images here)
    assert {"noise_norm", "attention_entropy", "score_anisotropy", "generation_similarity"} <= set(rows[0])
    assert all(0 <= float(row["copy_share"]) <= 1 for row in rows)
    for name, row in out["table"].items():
        assert row["ms_per_prompt"] > 0 and row["cost_vs_generation"] > 0, name
    assert (tmp_path / "a" / "scatter.png").is_file() and (tmp_path / "a" / "detectors.md").is_file()
    assert "noise_norm/ms_per_prompt" in json.loads((tmp_path / "a" / "metrics.json").read_text())
    # a second run reuses the ground-truth generations (content-keyed folder) instead of making them again
    truth = run / "samples" / "detect_truth_seed100000"
    stamps = {p.name: p.stat().st_mtime_ns for p in truth.glob("*.png")}
    again = ["detectors=[score_anisotropy]"]
    detect(compose_config("detect.yaml", [f"ckpt_path={run}", *TINY_DETECT, *again], tmp_path / "b"))
    assert {p.name: p.stat().st_mtime_ns for p in truth.glob("*.png")} == stamps


@pytest.mark.slow
def test_detectors_run_on_the_tiny_stable_diffusion_run(tiny_run, tmp_path):
    run = tiny_run("sd_finetune_laion10k").run_dir
    overrides = [
        f"ckpt_path={run}",
        *TINY_DETECT,
        "detectors=[noise_norm,attention_entropy,score_anisotropy]",
    ]
    out = detect(compose_config("detect.yaml", overrides, tmp_path))
    assert out["summary"]["num_prompts"] == 8
    assert set(out["scores"]) == {"noise_norm", "attention_entropy", "score_anisotropy"}


def test_an_unconditional_model_is_refused_with_what_to_use(tiny_run, tmp_path):
    run = tiny_run("ddpm_quickstart").run_dir
    with pytest.raises(ValueError, match="unconditional model.*attack=extraction"):
        detect(compose_config("detect.yaml", [f"ckpt_path={run}", "device=cpu"], tmp_path))


@pytest.mark.slow
def test_unknown_detector_and_empty_prompt_file_are_refused(tiny_run, tmp_path):
    run = tiny_run("t2i_quickstart").run_dir
    with pytest.raises(ValueError, match="unknown detector.*valid: noise_norm"):
        detect(compose_config("detect.yaml", [f"ckpt_path={run}", "detectors=[norm]"], tmp_path / "a"))
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="prompts.txt"):
        detect(compose_config("detect.yaml", [f"ckpt_path={run}", f"prompts={empty}"], tmp_path / "b"))


@pytest.mark.slow
def test_a_training_run_ends_with_its_detectors(detected_run):
    metrics = detected_run.metrics
    assert metrics["detect/num_prompts"] == 8 and "detect/noise_norm/ms_per_prompt" in metrics
    assert (detected_run.run_dir / "detection" / "scores.csv").is_file()


def test_unknown_callback_settings_are_named():
    from src.callbacks.detection import DetectAtEnd

    with pytest.raises(ValueError, match="unknown keys \\['steps'\\]"):
        DetectAtEnd(["noise_norm"], {"steps": 3})


def test_a_detector_variant_overrides_only_its_own_options():
    options = {"noise_norm": {"generations": 4, "steps": 50, "scored_steps": None}}
    options["noise_norm:first_step"] = {"generations": 1, "scored_steps": 1}
    assert detector_options(options, "noise_norm") == {"generations": 4, "steps": 50, "scored_steps": None}
    assert detector_options(options, "noise_norm:first_step") == {
        "generations": 1,
        "steps": 50,
        "scored_steps": 1,
    }
    assert detector_options(options, "noise_norm:other") == options["noise_norm"]  # a variant without options
    with pytest.raises(ValueError, match="unknown detector.*'norm:first'.*variant"):
        check_detectors(object(), ["noise_norm:first_step", "norm:first"])


@pytest.mark.slow
def test_the_detection_study_runs_and_aggregates_on_a_tiny_model(data_dir, tmp_path):
    """conf/sweep/memorization_detection.yaml (the nodup arm) on a few CPU steps: every detector and variant,
    every inference mitigation, then the study's aggregate with its realism and cost columns."""
    overrides = [
        "experiment=t2i_mitigations",
        "+sweep=memorization_detection",
        *tiny_text2img_overrides(data_dir, subset_size=4),
        "data.control_size=4",
        "callbacks.replication.num_images=4",
        "callbacks.replication.batch_size=4",
        "callbacks.replication.steps=2",
        "++callbacks.detect.settings.bootstrap=10",
        "++callbacks.detect.settings.options.truth.generations=2",
        "++callbacks.detect.settings.options.truth.steps=2",
        "++callbacks.detect.settings.options.noise_norm.steps=2",
        "++callbacks.detect.settings.options.noise_norm.generations=1",
        "++callbacks.detect.settings.options.attention_entropy.steps=2",
        "++callbacks.detect.settings.options.score_anisotropy.steps=4",
        "++callbacks.detect.settings.options.generation_similarity.generations=2",
        "++callbacks.detect.settings.options.generation_similarity.steps=2",
    ]
    run = tmp_path / "run"
    train(compose_config("train.yaml", overrides, run))
    aggregate = load_script(
        ROOT / "experiments" / "memorization_detection" / "aggregate.py", "detection_study"
    )
    detectors, mitigations = aggregate.main([str(run), "--out", str(tmp_path / "study")])
    names = [r["detector"] for r in detectors]
    assert names == [
        "noise_norm",
        "noise_norm:first_step",
        "attention_entropy",
        "attention_entropy:last",
        "score_anisotropy",
        "generation_similarity",
    ]
    assert all(r["arm"] == "nodup" and r["prompts"] == 8 and r["ms_per_prompt"] > 0 for r in detectors)
    rows = {r["mitigation"].split(" (")[0]: r for r in mitigations}
    assert {
        "held-out faces",
        "training faces",
        "uniform noise",
        "none",
        "gni",
        "prompt_embedding",
        "delayed_guidance",
    } <= set(rows)
    assert "attention_rescale" in rows and rows["none"]["cost_vs_plain"] == 1.0
    for name, row in rows.items():
        assert -1 <= row["realism_low"] <= row["realism"] <= row["realism_high"] <= 1, name
        if name not in ("held-out faces", "training faces", "uniform noise"):
            assert row["n"] == 4 and 0 <= row["share_gt_thr"] <= 1 and row["cost_vs_plain"] > 0, name
    for name in ("detectors.md", "detectors.png", "mitigations.md", "mitigations.png", "mitigations.csv"):
        assert (tmp_path / "study" / name).is_file(), name
