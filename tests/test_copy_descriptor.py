"""The copy descriptor (SSCD recipe) and the planted-copy benchmark: the loss terms and mixup on hand-worked
values, the augmentations, the benchmark's build and scores, and the descriptor trained, loaded and evaluated
through the entry points."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from src.data.copy_views import (
    CopyAugment,
    CopyDataModule,
    TwoViews,
    add_noise,
    overlay_shape,
    overlay_text,
    paste_onto,
)
from src.data.planted_copies import EDITS, build_planted_copies, edit_copy, read_planted_copies
from src.losses import copy_infonce_loss, koleo_loss
from src.metrics.copy_detection import copy_detection_metrics, micro_ap, recall_at_precision
from src.models.copy_descriptor import mix_views
from src.nn.extractors import CopyDescriptorExtractor, PixelExtractor
from tests.conftest import ROOT, compose_config, load_script, tiny_copy_overrides


def test_infonce_equals_its_definition_pair_by_pair():
    torch.manual_seed(0)
    e = F.normalize(torch.randn(6, 5), dim=1)  # views 0-2 first views of images 0-2, views 3-5 second views
    image = torch.tensor([0, 1, 2, 0, 1, 2])
    match = image[:, None] == image[None, :]
    match[1, 4] = match[4, 1] = match[1, 0] = match[0, 1] = True  # view 1 mixed with image 0: two positives
    t = 0.05
    loss = copy_infonce_loss(e, e, match, torch.arange(6), t)
    s = (e @ e.T / t).double()
    rows = []
    for i in range(6):
        negatives = [k for k in range(6) if not match[i, k]]
        terms = [
            -(s[i, j] - torch.log(torch.exp(s[i, j]) + sum(torch.exp(s[i, k]) for k in negatives)))
            for j in range(6)
            if match[i, j] and j != i
        ]
        rows.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(float(sum(rows) / 6), rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        copy_infonce_loss(e, e, torch.eye(6, dtype=torch.bool), torch.arange(6), t)


def test_koleo_is_the_log_distance_to_the_nearest_non_match():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])
    match = torch.eye(4, dtype=torch.bool)
    match[0, 3] = match[3, 0] = True  # rows 0 and 3 are views of one image: not each other's neighbour
    nearest = torch.tensor([0.6, 0.8, 0.8, 0.6])  # cosines to the nearest non-matching embedding
    expected = -torch.log(torch.sqrt(2 - 2 * nearest)).mean()
    assert koleo_loss(e, e, match).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mix_views_pairs_mirror_views_and_adds_the_partner_as_a_positive():
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    targets = torch.eye(2, dtype=torch.bool).repeat(2, 1)  # views of images 0, 1, 0, 1
    rng = np.random.default_rng(0)
    mixed, new_targets, count = mix_views(images, targets, prob=1.0, alpha=2.0, cutmix_prob=0.0, rng=rng)
    assert count == 4
    for i in range(4):
        j = 3 - i  # the mirrored view
        lam = (mixed[i, 0, 0, 0] - images[j, 0, 0, 0]) / (images[i, 0, 0, 0] - images[j, 0, 0, 0])
        assert 0 < lam < 1 and torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j])
        assert new_targets[i].tolist() == (targets[i] | targets[j]).tolist()
    same, unchanged, none = mix_views(images, targets, prob=0.0, alpha=2.0, cutmix_prob=0.5, rng=rng)
    assert none == 0 and same is images and unchanged is targets
    cut, _, _ = mix_views(images, targets, prob=1.0, alpha=2.0, cutmix_prob=1.0, rng=np.random.default_rng(3))
    for i in range(4):  # cutmix: every pixel comes from the view or its partner
        values = set(cut[i].unique().tolist())
        assert values <= {float(i), float(3 - i)}


def test_augmentations_keep_size_and_change_the_image():
    rng = __import__("random").Random(0)
    image = Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    for overlay in (overlay_text, overlay_shape):
        out = overlay(image, rng)
        assert out.size == image.size and out.mode == "RGB"
        assert not np.array_equal(np.asarray(out), np.asarray(image))
    view = CopyAugment(32)(image)
    assert view.shape == (3, 32, 32) and torch.isfinite(view).all()
    background = Image.new("RGB", (80, 60), (0, 255, 0))
    pasted = np.asarray(paste_onto(image, background, rng))
    green = (pasted == [0, 255, 0]).all(axis=-1).mean()
    assert pasted.shape == (48, 48, 3) and 1 - 0.8**2 - 0.01 <= green <= 1 - 0.4**2 + 0.01


def test_noise_and_reference_views(tmp_path):
    rng = __import__("random").Random(0)
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    noisy = np.asarray(add_noise(grey, 0.05, rng), dtype=np.float64) / 255
    assert noisy.std() == pytest.approx(0.05, rel=0.1) and noisy.mean() == pytest.approx(128 / 255, abs=0.01)
    image = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "a.png")
    image.save(tmp_path / "b.png")
    reference = CopyDataModule(views="reference", image_size=32)
    from src.data.style.transforms import eval_transform

    as_indexed = eval_transform(32, reference.hparams.mean, reference.hparams.std)
    views = TwoViews(tmp_path, ["a.png", "b.png"], CopyAugment(32, noise_p=1.0), as_indexed)[0]["views"]
    assert torch.equal(
        views[0], as_indexed(image)
    )  # the first view is the image as a copy detector indexes it
    assert views.shape == (2, 3, 32, 32) and not torch.equal(views[0], views[1])
    with pytest.raises(ValueError, match="data.views='both'"):
        CopyDataModule(views="both")


@pytest.fixture(scope="module")
def planted(data_dir):
    return build_planted_copies(data_dir, seed=0, image_size=32)


def test_planted_copies_are_deterministic_and_labelled(planted, tmp_path):
    rset, rows = read_planted_copies(planted)
    roles = {r["role"] for r in rows}
    assert roles == {"source", "distractor", "copy", "negative"}
    copies = [r for r in rows if r["role"] == "copy"]
    sources = {r["source"] for r in rows if r["role"] == "source"}
    assert {r["source"] for r in copies} == sources and len(copies) == 2 * len(sources)
    assert {r["edit"] for r in copies} == set(EDITS)
    has_copy = rset.query_labels.any(dim=1)
    assert int(has_copy.sum()) == len(copies) and rset.task == "copy_detection"
    for q in np.flatnonzero(has_copy.numpy())[:5]:  # a copy's label is the database row of its source
        source = rset.query[q].split("/")[-1].split("__")[0]
        row = rset.database.index(f"images/database/{source}.png")
        assert rset.database_labels[row, rset.query_labels[q]].all()
    again = build_planted_copies(tmp_path, seed=0, image_size=32)
    for r in rows[::25]:
        assert (planted / r["path"]).read_bytes() == (again / r["path"]).read_bytes()


def test_a_colour_cast_copy_is_found_by_channel_pixels_and_missed_by_global_ones():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:32, 0:32] / 31
    source = Image.fromarray((np.stack([xx, yy, (xx + yy) / 2], -1) * 255).astype(np.uint8))
    copy = edit_copy(source, "colour_cast", rng, source)
    for normalize, low, high in (("channel", 0.99, 1.01), ("global", -1.0, 0.95)):
        extractor = PixelExtractor(32, normalize=normalize)
        load = extractor.transform()
        features = extractor(torch.stack([load(source), load(copy)]))
        assert low <= float(features[0] @ features[1]) <= high, normalize
    with pytest.raises(ValueError, match="unknown edit"):
        edit_copy(source, "sepia", rng, source)


def test_copy_detection_metrics_on_hand_values():
    # 4 queries: three copy database images 0, 1, 2; the last copies nothing. Each query's nearest neighbour
    # is set by hand: q0 -> 0 (0.95, right), q1 -> 2 (0.9, wrong), q2 -> 2 (0.8, right), q3 -> 1 (0.85).
    database = torch.eye(3)
    query = torch.tensor(
        [[0.95, 0.1, 0.0], [0.0, 0.1, 0.9], [0.0, 0.3, 0.8], [0.0, 0.85, 0.5]], dtype=torch.float32
    )
    query_labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    database_labels = torch.eye(3, dtype=torch.bool)
    m = copy_detection_metrics(
        query, database, query_labels, database_labels, thresholds=(0.82,), bootstrap=0
    )
    # ranked: 0.95 right, 0.9 wrong, 0.85 wrong, 0.8 right -> AP = (1/1 + 2/4) / 3 copies
    assert m["uAP"] == pytest.approx(0.5)
    assert m["recall@p90"] == pytest.approx(1 / 3) and m["threshold@p90"] == pytest.approx(0.95)
    assert m["precision@0.82"] == pytest.approx(1 / 3) and m["recall@0.82"] == pytest.approx(1 / 3)
    assert m["flagged@0.82"] == pytest.approx(0.75) and m["num_with_copy"] == 3
    assert m["recall@top1"] == pytest.approx(2 / 3) and m["mAP@1"] == pytest.approx(2 / 3)
    assert micro_ap(np.array([0.5]), np.array([False]), 0) != micro_ap(np.array([0.5]), np.array([False]), 0)
    assert recall_at_precision(np.array([0.9, 0.9]), np.array([True, False]), 2) == (0.0, math.inf)
    boot = copy_detection_metrics(query, database, query_labels, database_labels, (0.82,), bootstrap=200)
    assert boot["uAP_lo"] <= boot["uAP"] <= boot["uAP_hi"]
    with pytest.raises(ValueError, match="no query has a copy"):
        copy_detection_metrics(
            query, database, torch.zeros(4, 3, dtype=torch.bool), database_labels, bootstrap=0
        )


@pytest.mark.slow
def test_the_copy_descriptor_trains_loads_and_scores_on_the_planted_copies(data_dir, tmp_path):
    from src.evaluate import evaluate
    from src.train import train

    run_dir = tmp_path / "train"
    # Validation at steps 2 and 4; the "best" metric is a constant, so the best checkpoint stays at step 2
    # while last.ckpt must hold step 4 (Lightning 2.6 alone would leave last.ckpt at step 2).
    overrides = [
        "experiment=sscd_quickstart",
        *tiny_copy_overrides(data_dir),
        "trainer.max_steps=4",
        "callbacks.best_checkpoint.monitor=val/num_queries",
        "eval_before_training=false",  # scored before training by test_every_experiment_runs_a_few_cpu_steps
    ]
    metrics = train(compose_config("train.yaml", overrides, run_dir))
    assert 0 <= metrics["test/uAP"] <= 1 and metrics["train/loss"] > 0
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    assert [p.name for p in (run_dir / "checkpoints").glob("best_*.ckpt")] == ["best_step0000002.ckpt"]
    extractor = CopyDescriptorExtractor(str(checkpoint))
    assert extractor.dim == 16 and extractor.image_size == 32
    random_net = CopyDescriptorExtractor(None, backbone="resnet10t", dim=16, image_size=32)
    image = Image.new("RGB", (40, 40), (200, 30, 90))
    assert not torch.allclose(
        extractor(extractor.transform()(image)[None]), random_net(random_net.transform()(image)[None])
    )

    scored = evaluate(
        compose_config(
            "evaluate.yaml",
            [
                f"paths.data_dir={data_dir}",
                "benchmark=planted_copies",
                "benchmark.image_size=32",
                "extractor=copy_descriptor",
                f"extractor.checkpoint={checkpoint}",
                "bootstrap=50",
                "num_workers=0",
            ],
            tmp_path / "evaluate",
        )
    )
    assert scored["uAP"] == pytest.approx(metrics["test/uAP"], abs=1e-4)  # same images, same network
    assert scored["uAP_lo"] <= scored["uAP"] <= scored["uAP_hi"]
    assert "threshold@p90" in (tmp_path / "evaluate" / "table_row.md").read_text()
    with pytest.raises(
        ValueError, match="checkpoint of DDPMModule; expected a checkpoint of CopyDescriptorModule"
    ):
        CopyDescriptorExtractor(str(_csd_like_checkpoint(tmp_path)))


def _csd_like_checkpoint(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"unet": {}}, "module_class": "src.models.ddpm.DDPMModule"},
        path,
    )
    return path


@pytest.mark.slow
def test_restudy_measures_a_finished_run_again_with_other_descriptors(tiny_run, tmp_path):
    run = tiny_run("ddpm_quickstart").run_dir
    restudy = load_script(ROOT / "experiments" / "copy_descriptor" / "restudy.py", "restudy")
    rows = restudy.main(
        [str(run), "--descriptor", "pixels:0.9", "--descriptor", "pixels_channel:0.5"]
        + ["--descriptor", "pixels_channel+regions:0.5", "--region-scales", "0.7", "--region-grid", "2"]
        + ["--out", str(tmp_path)]
    )
    assert [r["descriptor"] for r in rows] == [
        "pixels@0.9",
        "pixels_channel@0.5",
        "pixels_channel+regions@0.5",
    ]
    # region matching takes the best of more pairs: never below the whole-image score
    assert rows[2]["train_sim_95pc"] >= rows[1]["train_sim_95pc"] - 1e-6
    original = __import__("json").loads((run / "metrics.json").read_text())
    # the default descriptor at the run's threshold gives back the run's own figure
    assert rows[0]["train_share"] == pytest.approx(original["replication/train/sim_gt_thr"])
    assert rows[0]["control_share"] == pytest.approx(original["replication/control/sim_gt_thr"])
    for r in rows:
        assert r["train_share_low"] <= r["train_share"] <= r["train_share_high"]
    assert (tmp_path / "restudy.md").read_text().count("|") > 20


def test_compare_tabulates_finished_evaluations_per_descriptor_and_edit(tmp_path, monkeypatch):
    """experiments/copy_descriptor/compare.py on evaluation folders that are already finished (nothing is re-run):
    the descriptor table with intervals, the per-edit table from each run's embeddings (whole images and region
    matching), the paired margins of the trained descriptor, the figure."""
    from src.utils.embeddings import save_embeddings

    compare = load_script(ROOT / "experiments" / "copy_descriptor" / "compare.py", "compare_descriptors")
    database = torch.eye(3)
    # a blur copy found (cosine 1), a crop copy whose nearest is another image (0.8), a query with no copy (0.8)
    query = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.8], [0.6, 0, 0.8]])
    # with regions: a region of database image 1 is the crop copy itself, every other region is its image
    region_query = torch.stack([query, query], dim=1)
    region_database = torch.stack([database, database], dim=1)
    region_database[1, 1] = query[1]
    query_labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    database_labels = torch.eye(3, dtype=torch.bool)
    paths = ["images/query/a__blur.png", "images/query/b__crop.png", "images/query/c__none.png"]
    names = [*compare.WEIGHT_FREE, "copy_descriptor_random", "copy_descriptor"]
    for name in names + [n + compare.REGIONS for n in names]:
        q, d = (region_query, region_database) if name.endswith(compare.REGIONS) else (query, database)
        metrics = copy_detection_metrics(q, d, query_labels, database_labels, (0.5, 0.75, 0.9), 20)
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(__import__("json").dumps(metrics))
        save_embeddings(
            run / "embeddings.npz",
            q,
            d,
            query_labels,
            database_labels,
            ["a", "b", "c"],
            paths,
            ["a", "b", "c"],
            task="copy_detection",
        )
    monkeypatch.setattr("sys.argv", ["compare.py", "--out", str(tmp_path), "--checkpoint", "trained.ckpt"])
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("a finished run was run again"))
    compare.main()
    table = (tmp_path / "descriptors.md").read_text()
    assert all(f"| {name} |" in table for name in names) and "[" in table
    edits = (tmp_path / "edits.md").read_text()
    assert "blur (n=1)" in edits and "crop (n=1)" in edits and "none" not in edits.split("\n")[2]
    assert (
        "| pixels | 100 / 100 | 0 / 0 |" in edits
    )  # the blur copy found at p90's threshold 1.0, the crop missed
    assert "| pixels + regions | 100 / 100 | 100 / 100 |" in edits  # region matching finds the crop
    margins = (tmp_path / "margins.md").read_text()
    assert "| copy_descriptor + regions | pixels_channel + regions | +0.0 [+0.0, +0.0] |" in margins
    assert margins.count("| copy_descriptor |") == 5  # four weight-free descriptors and the random network
    assert (tmp_path / "descriptors.png").is_file()
