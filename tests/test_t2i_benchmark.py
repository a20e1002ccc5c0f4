"""The text-to-image benchmarks at tiny sizes: `lightning_overhead --module t2i` does the same math on both
sides, and `mitigation_cost` has a row per mitigation with positive times and the captions changed as each
mitigation says."""

import contextlib
import io

import pytest
import torch

from benchmarks import harness, lightning_overhead, mitigation_cost
from src.mitigations import INFERENCE_MITIGATIONS, SAMPLING_MITIGATIONS, TRAIN_MITIGATIONS

TINY = ["--image-size", "16", "--batch-size", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def one_thread():
    """The benchmarks set torch's thread count; restore it for the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_quietly(main, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main(argv)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def costs(one_thread):
    """One `mitigation_cost` run at tiny sizes: its result and printed report."""
    return run_quietly(mitigation_cost.main, [*TINY, "--repeats", "20", "--steps", "2"])


def test_training_step_same_math_and_report(one_thread):
    """Same weights, captions and noise on both sides: the same first loss and bitwise the same weights (the
    frozen text encoder, the trained UNet and its EMA copy) after the warm-up window."""
    argv = ["--module", "t2i", *TINY, "--steps", "2", "--repeats", "1", "--warmup", "1"]
    summary, out = run_quietly(lightning_overhead.main, argv)
    assert (
        summary["loss"]["lightning"] == summary["loss"]["plain"] > 0.1
    )  # untrained ε-prediction: MSE near 1
    assert summary["weight_diff"] == {"text_encoder": 0.0, "unet": 0.0, "ema": 0.0}
    assert summary["module"] == "Text2ImageModule" and "Lightning Trainer.fit (Text2ImageModule)" in out


def test_train_mitigation_table(costs):
    """A row per train-time mitigation (rc / rt / cwr also at p=1), positive times, the ratio to the step, and
    captions changed as the mitigation says: never by none / gn, always at p=1, about 4 in 5 by mc."""
    result, out = costs
    rows = result["train"]
    assert [(r["name"], r["options"].get("p")) for r in rows] == [
        ("none", None),
        ("mc", None),
        ("gn", None),
        ("rc", 0.1),
        ("rc", 1.0),
        ("rt", 0.1),
        ("rt", 1.0),
        ("cwr", 0.1),
        ("cwr", 1.0),
    ]
    assert {r["name"] for r in rows} == set(TRAIN_MITIGATIONS)
    for row in rows:
        assert row["text_us"] > 0 and row["total_us"] == row["text_us"] + row["embedding_us"]
        assert row["of_step"] == pytest.approx(row["total_us"] / (result["step_ms"] * 1e3))
        assert (row["embedding_us"] > 0) == (row["name"] == "gn")
    changed = {(r["name"], r["options"].get("p")): r["changed"] for r in rows}
    assert changed[("none", None)] == changed[("gn", None)] == 0.0
    assert changed[("rc", 1.0)] == changed[("rt", 1.0)] == changed[("cwr", 1.0)] == 1.0
    assert 0.5 < changed[("mc", None)] < 1.0  # 80 captions, each caption 0 with probability 1/5
    assert rows[2]["options"] == {"lam": 0.1}  # conf/mitigation/gn.yaml
    assert "Train-time caption mitigations" in out and "rt p=1.0" in out


def test_inference_mitigation_table(costs):
    result, out = costs
    rows = result["inference"]
    assert [r["name"] for r in rows] == [n for n in INFERENCE_MITIGATIONS if n not in SAMPLING_MITIGATIONS]
    assert result["cfg_step_ms"] > 0
    for row in rows:
        assert row["text_us"] > 0 and row["total_us"] == row["text_us"] + row["embedding_us"]
        assert row["of_step"] == pytest.approx(row["total_us"] / (result["cfg_step_ms"] * 1e3))
        assert (row["embedding_us"] > 0) == (row["name"] == "gni")
        assert row["changed"] == (0.0 if row["name"] in ("none", "gni") else 1.0)
    assert "Inference-time mitigations" in out and "a generation runs 50" in out


def test_batch_and_captions():
    lists = harness.caption_lists(3, seed=0)
    assert [len(captions) for captions in lists] == [5, 5, 5]
    assert lists[1][0].startswith("portrait of bako, a ")  # face_name(1): caption 0 names the face
    assert harness.caption_lists(3, seed=0) == lists and harness.caption_lists(3, seed=1) != lists
    batch = harness.image_batch(3, 16, seed=0, captions=True)
    assert batch["image"].shape == (3, 3, 16, 16) and -1 <= batch["image"].min() <= batch["image"].max() <= 1
    assert batch["caption"] == [captions[0] for captions in lists]


def test_module_follows_the_model_config(one_thread):
    """`build_model` builds what `src.train model=text2img` builds, with equal weights for equal seeds."""
    args = lightning_overhead.parse_args(["--module", "t2i", *TINY])
    module = lightning_overhead.build_module(args)
    assert type(module).__name__ == "Text2ImageModule" and module.hparams.prompt_dropout == 0.1
    assert module.text_encoder.dim == 128 and module.text_encoder.context_length == 32
    assert module.unet.config.block_out_channels == [32, 64, 64] and module.unet.config.sample_size == 16
    again = lightning_overhead.build_module(args)
    assert all(
        torch.equal(a, b)
        for a, b in zip(module.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_mitigation_cost_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        mitigation_cost.parse_args(["--repeats", "0"])
    args = mitigation_cost.parse_args([])
    assert (args.image_size, args.batch_size, args.repeats) == (32, 16, 200)
