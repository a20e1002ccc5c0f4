"""The attack benchmarks (benchmarks/extraction_pipeline.py, benchmarks/membership_throughput.py) at tiny sizes:
each table has its rows, extrapolations scale as they say, and the forward passes are counted."""

import pytest
import torch

from benchmarks import extraction_pipeline, harness, membership_throughput


def table_lines(out: str, first_title: str) -> list[str]:
    """The printed table: its header (the line starting with `first_title`) and the rows below it."""
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith(first_title)))
    return lines[start:]


# ---- extraction pipeline ---------------------------------------------------------------------------------
PIPELINE_TINY = ["--k", "16", "--copies", "12", "--size", "16", "--steps", "2", "--gen-batch", "2"]
PIPELINE_TINY += ["--repeats", "1", "--threads", "1"]


def test_extraction_pipeline_benchmark_table(capsys, quiet_cpu):
    rows = extraction_pipeline.main([*PIPELINE_TINY, "--train-size", "60", "--timed-train-size", "30"])
    assert [row["stage"] for row in rows] == ["tiled_l2", "clique", "verify", "filter", "generate"]
    by_stage = {row["stage"]: row for row in rows}
    filter_stages = [by_stage[name] for name in ("tiled_l2", "clique", "verify")]
    assert by_stage["filter"]["seconds"] == pytest.approx(sum(row["seconds"] for row in filter_stages))
    assert by_stage["generate"]["share"] == 1.0
    assert by_stage["filter"]["share"] == pytest.approx(
        by_stage["filter"]["seconds"] / by_stage["generate"]["seconds"]
    )
    assert by_stage["filter"]["peak_mib"] == max(row["peak_mib"] for row in filter_stages)
    assert all(row["seconds"] > 0 and row["peak_mib"] >= 0 for row in rows)
    out = capsys.readouterr().out
    table = table_lines(out, "stage")
    assert [line.split("  ")[0].strip() for line in table[1:6]] == [
        "tiled l2, K x K = 256 pairs",
        "max clique at threshold 0.1",
        "verify, K x M=60 (adaptive score, n=50) EXTRAPOLATED from M=30",
        "filter total",
        "generate K, DDIM-2 EXTRAPOLATED from 2 images",
    ]
    assert "clique: 12 members at threshold 0.1 (12 planted near-copies), flagged True" in out


def test_extraction_pipeline_extrapolates_verification_and_generation_linearly():
    args = extraction_pipeline.parse_args(["--k", "100", "--train-size", "1000", "--timed-train-size", "250"])
    results = {
        name: [{"seconds": 1.0}, {"seconds": 2.0}, {"seconds": 9.0}] for name in extraction_pipeline.STAGES
    }
    memory = {name: {"peak": harness.MIB} for name in extraction_pipeline.STAGES}
    by_stage = {row["stage"]: row for row in extraction_pipeline.summarise(args, results, memory)}
    assert by_stage["tiled_l2"]["seconds"] == 2.0 and by_stage["clique"]["seconds"] == 2.0
    assert by_stage["verify"]["seconds"] == 8.0  # median 2 s on 250 training images, x 1000 / 250
    assert by_stage["generate"]["seconds"] == 25.0  # median 2 s for 8 images, x 100 / 8
    assert by_stage["filter"]["share"] == pytest.approx(12.0 / 25.0)


def test_extraction_pipeline_generations_hold_the_planted_copies():
    args = extraction_pipeline.parse_args(["--k", "20", "--copies", "12", "--size", "16"])
    generations = extraction_pipeline.make_generations(args, torch.device("cpu"))
    assert generations.shape == (20, 3, 16, 16) and 0 <= generations.min() and generations.max() <= 1
    inputs = {"generations": generations}
    inputs["distances"] = extraction_pipeline.stage_calls(args, inputs)["tiled_l2"]()
    (clique,) = extraction_pipeline.stage_calls(args, inputs)["clique"]()
    assert clique["clique"] == list(range(12)) and clique["flagged"]


def test_extraction_pipeline_rejects_bad_sizes():
    for argv in (["--size", "30"], ["--k", "0"], ["--copies", "600"], ["--timed-train-size", "200000"]):
        with pytest.raises(SystemExit):
            extraction_pipeline.parse_args(argv)


# ---- membership throughput -------------------------------------------------------------------------------
def test_membership_throughput_benchmark_table(capsys, quiet_cpu):
    argv = ["--image-size", "16", "--images", "3", "--batch-size", "2", "--repeats", "1", "--threads", "1"]
    rows = membership_throughput.main(argv)
    assert [row["attack"] for row in rows] == ["forward", "loss_one", "loss_default", "secmi", "pia"]
    forwards = {row["attack"]: row["forwards"] for row in rows}
    assert forwards == {"forward": 1, "loss_one": 1, "loss_default": 20, "secmi": 11, "pia": 2}
    baseline = rows[0]
    assert baseline["x_forward"] == 1.0 and baseline["x_per_pass"] == 1.0
    for row in rows:
        assert row["images_per_s"] == pytest.approx(1e3 / row["ms_per_image"])
        assert row["x_forward"] == pytest.approx(row["ms_per_image"] / baseline["ms_per_image"])
        assert row["peak_mib"] > 0
    table = table_lines(capsys.readouterr().out, "attack")
    assert [line.split("  ")[0].strip() for line in table[1:6]] == [
        "UNet forward, t=100 (baseline)",
        "loss, t=100, 1 draw",
        "loss, 5 t x 4 draws (conf/attack/loss.yaml)",
        "SecMI, t_sec=100, k=10",
        "PIA, t=200, p=4",
    ]


def test_membership_throughput_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        membership_throughput.parse_args(["--images", "0"])


# ---- detection cost --------------------------------------------------------------------------------------
def test_detection_cost_benchmark_table(capsys, quiet_cpu):
    from benchmarks import detection_cost

    tiny = ["--threads", "1", "--prompts", "2", "--repeats", "1", "--steps", "3", "--image-size", "16"]
    result = detection_cost.main([*tiny, "model.sample_steps=2"])
    names = [row["what"] for row in result["rows"]]
    assert names[:5] == list(detection_cost.DETECT_DEFAULTS)
    assert names[5] == "plain sampling (per image)" and len(names) == 9
    assert all(row["ms"] > 0 and row["ratio"] > 0 for row in result["rows"])
    assert "One generation of one prompt" in capsys.readouterr().out
    only = detection_cost.main([*tiny, "--only", "mitigations", "model.sample_steps=2"])["rows"]
    assert [row["what"] for row in only] == names[5:]
