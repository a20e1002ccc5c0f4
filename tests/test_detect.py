"""`python -m src.detect` on tiny trained runs: every detector scores every prompt against the measured ground
truth, on the from-scratch text-to-image model and on the tiny Stable Diffusion directory; bad input is refused
with what applies."""

import csv
import json

import pytest

from src.detect import detect
from tests.conftest import compose_config

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
