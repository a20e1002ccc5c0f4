"""The partial-copy benchmark: the metrics and the average rank on hand-worked values, the split-product
similarity, each kind of copy holding what it claims to hold, RePaint keeping the known region, the folder layout,
and the configs run through `src.evaluate`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from src.data.partial_copies import (
    build_partial_copies,
    diagonal_keep,
    load_copy_folders,
    patch_keep,
    read_mask,
    segment,
    segmix_copy,
)
from src.metrics.copy_detection import (
    average_rank,
    partial_copy_metrics,
    positive_ranks,
    split_product_scores,
    trapezoid_ap,
)
from tests.conftest import ROOT, compose_config, load_script


def photo(seed: int, size: int = 32) -> Image.Image:
    """A blocky random image: a few flat regions, so segmentation finds segments."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)


def image_folder(path, count: int, size: int = 32):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(i, size).save(path / f"img{i:02d}.png")
    return path


def test_trapezoid_ap_on_hand_values():
    # positives at ranks 0 and 2 of 2: (1 + 1) / 2 * 1/2 + (1/2 + 2/3) / 2 * 1/2
    assert trapezoid_ap(np.array([0, 2]), 2) == pytest.approx(0.5 + (0.5 + 2 / 3) / 4)
    assert trapezoid_ap(np.array([0, 1, 2]), 3) == pytest.approx(1.0)
    assert trapezoid_ap(np.array([1]), 1) == pytest.approx((0 + 0.5) / 2)


def test_partial_copy_metrics_on_a_hand_made_ranking():
    # 2 queries, database of 4 along axes: query 0 copies rows 0 and 2; query 1 copies row 3
    database = torch.eye(4)
    query = F.normalize(torch.tensor([[0.9, 0.5, 0.1, 0.0], [0.0, 0.0, 0.1, 0.3]]), dim=1)
    ql = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    dl = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]], dtype=torch.bool)
    ranks = positive_ranks(query, database, ql, dl)
    assert [r.tolist() for r in ranks] == [[0, 2], [0]]
    m = partial_copy_metrics(query, database, ql, dl, ks=(1, 2), bootstrap=0)
    assert m["mAP"] == pytest.approx((0.5 + (0.5 + 2 / 3) / 4 + 1.0) / 2)
    assert m["MRR"] == pytest.approx(1.0)
    # query 0: last copy at rank 3, so precision@2 is over min(2, 3) = 2 -> 1/2; query 1: min(2, 1) = 1 -> 1
    assert m["precision@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["recall@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="same extractor"):
        partial_copy_metrics(query, database[:, :3], ql, dl, bootstrap=0)


def test_split_product_is_the_best_position_match():
    torch.manual_seed(0)
    q, d = F.normalize(torch.randn(3, 4 * 5), dim=1), F.normalize(torch.randn(6, 4 * 5), dim=1)
    scores = split_product_scores(q, d, chunks=4)
    by_hand = torch.stack(
        [torch.stack([max((qi.view(4, 5)[t] @ dj.view(4, 5)[t]) for t in range(4)) for dj in d]) for qi in q]
    )
    assert torch.allclose(scores, by_hand, atol=1e-6)
    assert torch.allclose(split_product_scores(q, d, chunks=1), q @ d.T, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be cut into 3 chunks"):
        split_product_scores(q, d, chunks=3)


def test_average_rank_on_a_hand_made_table():
    table = {
        "a": {"s1/mAP": 0.9, "s2/mAP": 0.2},
        "b": {"s1/mAP": 0.5, "s2/mAP": 0.2},
        "c": {"s1/mAP": 0.1, "s2/mAP": 0.7},
    }
    # s1: a 1, b 2, c 3; s2: c 1, a and b tied for 2 and 3 -> 2.5 each
    assert average_rank(table) == {"a": 1.75, "b": 2.25, "c": 2.0}
    with pytest.raises(ValueError, match="lacks or adds settings"):
        average_rank({"a": {"x": 1.0}, "b": {"y": 1.0}})


def test_segmix_pastes_a_segment_of_the_source():
    source, background = photo(1), photo(2)
    labels = segment(source)
    assert labels.shape == (32, 32) and labels.min() == 0
    assert (labels == 0).sum() == max((labels == c).sum() for c in np.unique(labels))  # 0 is the largest
    for seed in range(5):
        copy, mask = segmix_copy(source, labels, background, "segmix", np.random.default_rng(seed))
        copy, src, bg = (np.asarray(x) for x in (copy, source, background))
        assert mask.any()
        assert (copy[mask] == src[mask]).all()  # the segment is there, in place
        assert (copy[~mask] == bg[~mask]).all()  # the rest is the background
    for kind in ("segmix_hard", "segmix_resized"):
        copy, mask = segmix_copy(source, labels, background, kind, np.random.default_rng(0))
        assert copy.size == source.size and mask.any()
        assert (np.asarray(copy)[~mask] == np.asarray(background)[~mask]).all()


def test_voc_masks_are_read_with_void_left_out(tmp_path):
    ids = np.zeros((8, 8), np.uint8)
    ids[2:6, 2:6], ids[0, :] = 15, 255
    Image.fromarray(ids, mode="L").save(tmp_path / "m.png")
    labels = read_mask(tmp_path / "m.png", (8, 8))
    assert set(np.unique(labels)) == {-1, 0, 15} and (labels[0] == -1).all()
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="one-channel PNG of class ids"):
        read_mask(tmp_path / "rgb.png", (8, 8))


def test_inpainting_masks():
    rng = np.random.default_rng(0)
    for _ in range(8):
        keep = diagonal_keep(16, rng)
        assert 0.4 < keep.mean() < 0.6
        patch = patch_keep(16, rng)
        side = int(np.sqrt(patch.sum()))
        assert side * side == patch.sum() and 4 <= side <= 7


def test_segmix_sets_build_in_the_forgery_layout(tmp_path):
    folder = image_folder(tmp_path / "images", 12)
    built = build_partial_copies(tmp_path / "data", "segmix", source=str(folder), image_size=32, copies=3)
    again = build_partial_copies(tmp_path / "data", "segmix", source=str(folder), image_size=32, copies=3)
    assert built == again  # cached
    rset = load_copy_folders(built)
    assert rset.task == "partial_copy" and rset.num_queries == 6
    assert all(p.endswith("0_query.png") for p in rset.query)
    assert rset.num_database == 6 * 3 + 3  # copies and the distractors
    assert rset.database_labels.sum(0).tolist() == [3] * 6
    query_source = {p.split("/")[1] for p in rset.query}
    for row, path in enumerate(rset.database):
        if path.startswith("sources/"):
            assert rset.label_names[int(rset.database_labels[row].nonzero())] == path.split("/")[1]
        else:
            assert path.startswith("distractors/") and path.split("/")[1][:-4] not in query_source
    (folder / "img00.png").unlink()  # other content, another set
    assert (
        build_partial_copies(tmp_path / "data", "segmix", source=str(folder), image_size=32, copies=3)
        != built
    )
    with pytest.raises(ValueError, match="holds 2 images"):
        build_partial_copies(tmp_path / "data", "segmix", source=str(image_folder(tmp_path / "two", 2)))
    with pytest.raises(ValueError, match="give benchmark.fill"):
        build_partial_copies(tmp_path / "data", "patch", source=str(folder))


@pytest.fixture(scope="module")
def ddpm_checkpoint(tiny_run):
    return str(tiny_run("ddpm_quickstart").run_dir / "checkpoints" / "last.ckpt")


def test_repaint_keeps_the_known_region_and_depends_on_its_seed_alone(ddpm_checkpoint):
    from src.nn.inpainting import RePaintFill

    fill = RePaintFill(ddpm_checkpoint, steps=4, jump_length=2, jump_n_sample=2, batch_size=2)
    sources = [photo(3), photo(4)]
    keeps = [diagonal_keep(32, np.random.default_rng(1)), patch_keep(32, np.random.default_rng(2))]
    images = torch.stack(
        [torch.from_numpy(np.asarray(s, np.float32) / 127.5 - 1).permute(2, 0, 1) for s in sources]
    )
    known = torch.stack([torch.from_numpy(k.astype(np.float32))[None] for k in keeps])
    raw = fill.raw(images, known, [5, 6])
    mask = known.bool().expand_as(raw)
    assert (raw[mask] - images[mask]).abs().max() < 1e-4  # RePaint's last step is the source itself
    assert (raw[~mask] - images[~mask]).abs().mean() > 0.05  # and the rest is drawn
    filled = fill(sources, keeps, [5, 6])
    for source, keep, image in zip(sources, keeps, filled, strict=True):
        assert (np.asarray(image)[keep] == np.asarray(source)[keep]).all()
    alone = fill(sources[1:], keeps[1:], [6])[0]
    assert (np.asarray(alone) == np.asarray(filled[1])).all()
    from src.generation import load_module

    built = RePaintFill(module=load_module(ddpm_checkpoint, "cpu"), steps=4, jump_length=2, jump_n_sample=2)
    assert torch.equal(
        built.raw(images, known, [5, 6]), raw
    )  # the checkpoint read at the nn level = the module
    with pytest.raises(ValueError, match="build the set with image_size=32"):
        fill([photo(3, 16)], [np.ones((16, 16), bool)], [0])


def test_diffusers_fill_names_the_missing_folder_and_the_cpu_alternative(tmp_path):
    from src.nn.inpainting import DiffusersFill

    with pytest.raises(FileNotFoundError, match="fill.kind=repaint"):
        DiffusersFill(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_benchmark_configs_run_through_evaluate_and_rank(ddpm_checkpoint, tmp_path, monkeypatch):
    """Every partial-copy config composes and runs (the inpainting ones with the tiny DDPM), a token extractor
    scores by split product, the study script ranks the finished runs and the notebook reads them."""
    from src.evaluate import evaluate
    from tests.test_notebooks import run_notebook

    folder = image_folder(tmp_path / "images", 10)
    common = [f"paths.data_dir={tmp_path / 'data'}", "bootstrap=20", "num_workers=0", "batch_size=16"]
    segmix = [f"benchmark.source={folder}", "benchmark.image_size=32"]
    inpaint = [
        f"benchmark.source={folder}",
        f"benchmark.fill.checkpoint={ddpm_checkpoint}",
        "benchmark.fill.steps=2",
        "benchmark.fill.jump_length=1",
        "benchmark.copies=2",
        "benchmark.max_sources=3",
    ]
    sets = {f"copy_{kind}": segmix for kind in ("segmix", "segmix_hard", "segmix_resized")}
    sets.update(copy_diagonal=inpaint, copy_patch=inpaint)
    extractors = {
        "pixels": ["extractor=pixels"],
        "split": [
            "extractor=dino_vitb16_split",
            "extractor.model=resnet18",
            "extractor.pretrained=null",
            "extractor.image_size=64",
            "extractor.resize_size=64",
        ],
    }
    runs = tmp_path / "runs"
    for bench, bench_overrides in sets.items():
        for name, ex in extractors.items():
            cfg = compose_config(
                "evaluate.yaml",
                [f"benchmark={bench}", *bench_overrides, *ex, *common, f"name={name}"],
                runs / bench / name,
            )
            metrics = evaluate(cfg)
            assert 0 <= metrics["mAP"] <= 1 and metrics["mAP_lo"] <= metrics["mAP"] <= metrics["mAP_hi"]
            assert metrics["num_queries"] == (3 if bench in ("copy_diagonal", "copy_patch") else 5)
    built = next((tmp_path / "data").glob("segmix_s0_*"))
    again = evaluate(
        compose_config(
            "evaluate.yaml",
            [
                "benchmark=copy_folders",
                f"benchmark.folder={built}",
                "extractor=pixels",
                *common,
                "name=folders",
            ],
            tmp_path / "folders",
        )
    )
    first = json.loads((runs / "copy_segmix" / "pixels" / "metrics.json").read_text())
    assert again["mAP"] == pytest.approx(first["mAP"])  # the same set read from its folder layout
    folders = ["benchmark=copy_folders", f"benchmark.folder={built}", *common]
    regions = ["region_scales=[0.7]", "region_grid=2"]
    by_regions = evaluate(
        compose_config("evaluate.yaml", [*folders, "extractor=pixels", *regions], tmp_path / "regions")
    )
    assert 0 <= by_regions["mAP"] <= 1 and by_regions["num_queries"] == 5
    assert "pixels + regions" in (tmp_path / "regions" / "table_row.md").read_text()
    with pytest.raises(ValueError, match="region matching compares global descriptors"):
        evaluate(
            compose_config("evaluate.yaml", [*folders, *extractors["split"], *regions], tmp_path / "bad")
        )
    saved = np.load(runs / "copy_segmix" / "split" / "embeddings.npz")
    assert int(saved["split_chunks"]) == 4  # resnet18 at 64 px: a 2 x 2 map
    rescored = evaluate(
        compose_config(
            "evaluate.yaml",
            [f"embeddings={runs / 'copy_segmix' / 'split' / 'embeddings.npz'}", *common, "name=again"],
            tmp_path / "again",
        )
    )
    split = json.loads((runs / "copy_segmix" / "split" / "metrics.json").read_text())
    assert rescored["mAP"] == pytest.approx(split["mAP"])  # split-product scoring survives the saved file
    study = load_script(ROOT / "experiments" / "copy_detection" / "run.py", "copy_detection_run")
    ranks = study.main(["--aggregate", str(runs), "--out", str(tmp_path / "out")])
    assert set(ranks) == {"pixels", "split"} and sum(ranks.values()) == pytest.approx(3.0)
    assert "Avg. rank" in (tmp_path / "out" / "rank.md").read_text()
    assert (tmp_path / "out" / "results.png").is_file()
    _, text, figures = run_notebook(
        "copy_detection.ipynb", monkeypatch, STUDY_DIR=tmp_path / "out", DATA_DIR=tmp_path / "data"
    )
    assert "5 set(s)" in text and len(figures) == 1 + 5


def test_a_source_without_an_object_segment_becomes_a_distractor(tmp_path):
    folder = image_folder(tmp_path / "images", 8)
    Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / "img00.png")  # flat: one segment, the background
    built = build_partial_copies(
        tmp_path / "data", "segmix_resized", source=str(folder), image_size=32, copies=2
    )
    rset = load_copy_folders(built)
    skipped = json.loads((built / "meta.json").read_text())["sources_without_segment"]
    assert all("img00" not in q for q in rset.query)  # never a query: it has nothing to paste
    assert rset.num_queries + len(skipped) == 4  # the 4 sources drawn
    assert all((built / "distractors" / f"{key}.png").is_file() for key in skipped)


def test_voc_masks_decide_the_segments_of_a_build(tmp_path):
    folder = image_folder(tmp_path / "images", 8)
    masks = tmp_path / "masks"
    masks.mkdir()
    ids = np.zeros((32, 32), np.uint8)
    ids[8:24, 8:24] = 15  # one object square; the rest background
    for path in folder.iterdir():
        Image.fromarray(ids, mode="L").save(masks / path.name)
    built = build_partial_copies(
        tmp_path / "data", "segmix", source=str(folder), image_size=32, copies=2, masks=str(masks)
    )
    assert "_masks" in built.name and json.loads((built / "meta.json").read_text())["masks"] == str(masks)
    square = np.zeros((32, 32), bool)
    square[8:24, 8:24] = True
    for source in (built / "sources").iterdir():
        query = np.asarray(Image.open(source / "0_query.png"))
        for copy in sorted(source.glob("[1-9].png")):
            pasted = np.asarray(Image.open(copy))
            # plain segmix pastes one class in place: either the object square or the background around it
            assert (pasted[square] == query[square]).all() or (pasted[~square] == query[~square]).all()
