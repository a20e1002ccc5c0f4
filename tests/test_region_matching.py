"""Region matching for copy detection: the boxes, the merged search against a brute-force reference, a crop that
only region matching finds, the paired uAP difference, and `src.evaluate region_scales=...` end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from src.data.images import region_boxes
from src.data.planted_copies import build_planted_copies
from src.metrics.copy_detection import copy_detection_metrics, partial_copy_metrics, uap_difference
from src.metrics.search import region_scores, region_topk
from src.nn.embed import embed_images
from src.nn.extractors import PixelExtractor
from src.utils.embeddings import load_embeddings
from tests.conftest import bench_overrides, compose_config


def test_region_boxes_tile_each_scale_on_the_grid_and_refuse_bad_values():
    boxes = region_boxes(100, 50, [0.5, 0.8], grid=3)
    assert len(boxes) == 18
    assert boxes[:3] == [(0, 0, 50, 25), (25, 0, 75, 25), (50, 0, 100, 25)]  # corners and the middle
    assert boxes[8] == (50, 25, 100, 50) and boxes[9] == (0, 0, 80, 40)
    assert region_boxes(64, 64, [0.5], grid=1) == [(16, 16, 48, 48)]
    with pytest.raises(ValueError, match="region scale 1.0"):
        region_boxes(64, 64, [1.0], grid=2)
    with pytest.raises(ValueError, match="region grid=0"):
        region_boxes(64, 64, [0.5], grid=0)


def test_region_topk_equals_the_brute_force_best_whole_to_region_match():
    torch.manual_seed(0)
    query = F.normalize(torch.randn(6, 4, 8), dim=-1)  # 6 images, whole + 3 regions, 8 dims
    database = F.normalize(torch.randn(9, 4, 8), dim=-1)
    whole = query[:, 0] @ database[:, 0].T
    crop = torch.einsum("qd,nrd->qnr", query[:, 0], database[:, 1:]).amax(-1)
    paste = torch.einsum("qrd,nd->qnr", query[:, 1:], database[:, 0]).amax(-1)
    reference = torch.maximum(whole, torch.maximum(crop, paste))  # region pairs are never compared
    assert not torch.equal(reference, whole) and torch.allclose(region_scores(query, database), reference)
    expected_scores, expected_index = reference.topk(5, dim=1)
    scores, index = region_topk(query, database, 5)
    assert torch.equal(index, expected_index)
    assert torch.allclose(
        scores, expected_scores.double() if scores.dtype == torch.float64 else expected_scores
    )
    scores, index = region_topk(query, database, 50)  # k clipped to the database, each image once
    assert index.shape == (6, 9) and all(len(set(row.tolist())) == 9 for row in index)
    assert torch.equal(region_topk(query[:, :1], database[:, :1], 3)[1], whole.topk(3, dim=1).indices)
    with pytest.raises(ValueError, match="same regions R"):
        region_topk(query, database[:, :3], 2)


def _smooth_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 8, 8))).float()
    fine = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return Image.fromarray((fine[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def test_a_crop_is_found_by_region_matching_and_missed_on_whole_images(tmp_path):
    sources = [_smooth_image(seed) for seed in range(6)]
    for i, image in enumerate(sources):
        image.save(tmp_path / f"db{i}.png")
    box = region_boxes(64, 64, [0.55], grid=4)[5]  # a copy of part of image 2, enlarged back to 64 px
    sources[2].crop(box).resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / "query.png")
    extractor = PixelExtractor(32, normalize="channel")
    regions = ((0.85, 0.7, 0.55), 4)
    database = embed_images(extractor, tmp_path, [f"db{i}.png" for i in range(6)], regions=regions)[0]
    query = embed_images(extractor, tmp_path, ["query.png"], regions=regions)[0]
    assert database.shape == (6, 49, extractor.dim) and query.shape == (1, 49, extractor.dim)
    whole = float(query[0, 0] @ database[2, 0])
    scores, index = region_topk(query, database, 1)
    assert int(index[0, 0]) == 2 and float(scores[0, 0]) > 0.97 > whole + 0.1
    labels = torch.eye(6, dtype=torch.bool)[2:3], torch.eye(6, dtype=torch.bool)
    assert copy_detection_metrics(query, database, *labels, bootstrap=0)["uAP"] == 1.0
    # the partial-copy scoring ranks the whole database by the same region scores
    assert partial_copy_metrics(query, database, *labels, bootstrap=0)["MRR"] == 1.0
    assert partial_copy_metrics(query[:, 0], database[:, 0], *labels, bootstrap=0)["MRR"] <= 1.0


def test_uap_difference_is_zero_for_one_descriptor_and_positive_for_a_planted_gap():
    rng = np.random.default_rng(0)
    has_copy = rng.random(200) < 0.7
    perfect = (np.where(has_copy, 0.9, 0.2) + 0.01 * rng.random(200), has_copy.copy())
    noisy = (rng.random(200), has_copy & (rng.random(200) < 0.6))
    same = uap_difference(noisy, noisy, has_copy, bootstrap=200)
    assert same["difference"] == same["difference_lo"] == same["difference_hi"] == 0.0
    gap = uap_difference(perfect, noisy, has_copy, bootstrap=200)
    assert gap["difference"] > 0.3 and 0 < gap["difference_lo"] <= gap["difference"] <= gap["difference_hi"]
    assert gap["share_above_zero"] == 1.0
    with pytest.raises(ValueError, match="predictions for 3 queries"):
        uap_difference(noisy, noisy, has_copy[:3])


def test_evaluate_scores_the_planted_copies_with_regions_and_rescores_the_saved_file(data_dir, tmp_path):
    from src.evaluate import evaluate
    from src.utils.embeddings import save_embeddings

    build_planted_copies(data_dir, seed=0, image_size=32)
    common = [f"paths.data_dir={data_dir}", "benchmark=planted_copies", "benchmark.image_size=32"]
    common += ["extractor=pixels_channel", "bootstrap=20", "num_workers=0"]
    run = tmp_path / "regions"
    scored = evaluate(compose_config("evaluate.yaml", [*common, "region_scales=[0.7]", "region_grid=2"], run))
    saved = load_embeddings(run / "embeddings.npz")
    assert saved["query"].shape[1:] == (5, 3 * 32 * 32) and saved["database"].shape[1] == 5
    assert "pixels_channel + regions" in (run / "table_row.md").read_text()
    labels = saved["query_labels"], saved["database_labels"]
    whole = copy_detection_metrics(saved["query"][:, 0], saved["database"][:, 0], *labels, bootstrap=0)
    assert scored["uAP"] != whole["uAP"]
    again = evaluate(
        compose_config("evaluate.yaml", [*common, f"embeddings={run / 'embeddings.npz'}"], tmp_path / "re")
    )
    assert again["uAP"] == scored["uAP"]  # the file's regions are searched as such
    flat = save_embeddings(
        tmp_path / "flat.npz",
        saved["query"][:, 0],
        saved["database"][:, 0],
        *labels,
        saved["label_names"],
        saved["query_paths"],
        saved["database_paths"],
        task="copy_detection",
    )
    with pytest.raises(ValueError, match="holds whole-image features only"):
        evaluate(
            compose_config(
                "evaluate.yaml", [*common, "region_scales=[0.7]", f"embeddings={flat}"], tmp_path / "bad"
            )
        )
    with pytest.raises(ValueError, match="region matching scores copy-detection and partial-copy benchmarks"):
        evaluate(
            compose_config(
                "evaluate.yaml",
                ["extractor=pixels", "region_scales=[0.7]", *bench_overrides(data_dir)],  # the tiny style set
                tmp_path / "style",
            )
        )
