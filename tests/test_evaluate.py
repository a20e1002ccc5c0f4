"""`python -m src.evaluate`: baselines, a trained CSD checkpoint, saved embeddings and PCA on the tiny benchmark."""

import json

import pytest
import torch

from src.evaluate import evaluate, pca_reduce
from src.metrics import retrieval_metrics
from src.metrics.search import bf16_rerank_topk, search_topk
from src.train import train
from src.utils.embeddings import load_embeddings
from tests.conftest import bench_overrides, compose_config, tiny_overrides


@pytest.mark.parametrize("extractor", ["pixels", "color_hist"])
def test_baseline_writes_metrics_row_and_embeddings_that_rescore_identically(extractor, data_dir, tmp_path):
    cfg = compose_config(
        "evaluate.yaml", [f"extractor={extractor}", *bench_overrides(data_dir)], tmp_path / "a"
    )
    metrics = evaluate(cfg)
    assert set(metrics) >= {"mAP@1", "mAP@10", "mAP@100", "recall@1", "recall@10", "recall@100"}
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == pytest.approx(metrics)
    row = (tmp_path / "a" / "table_row.md").read_text().splitlines()
    assert row[0].startswith("| Method | mAP@1 | mAP@10 | mAP@100 | R@1") and row[1].startswith(
        f"| {extractor} |"
    )
    assert f"{100 * metrics['mAP@10']:.2f}" in row[1]
    rescored = evaluate(
        compose_config(
            "evaluate.yaml",
            [f"embeddings={tmp_path / 'a' / 'embeddings.npz'}", *bench_overrides(data_dir)],
            tmp_path / "b",
        )
    )
    assert rescored == metrics


def test_pca_fitted_on_the_database_reduces_each_batch(data_dir, tmp_path):
    full = evaluate(
        compose_config("evaluate.yaml", ["extractor=pixels", *bench_overrides(data_dir)], tmp_path / "a")
    )
    overrides = ["extractor=pixels", "pca_dims=8", "pca_fit_images=100000", *bench_overrides(data_dir)]
    reduced = evaluate(compose_config("evaluate.yaml", overrides, tmp_path / "b"))
    saved = load_embeddings(tmp_path / "b" / "embeddings.npz")
    assert saved["query"].shape[1] == 8 and saved["database"].shape[1] == 8
    # the same PCA applied after the fact to the full embeddings gives the same scores
    raw = load_embeddings(tmp_path / "a" / "embeddings.npz")
    query, database = pca_reduce(raw["query"], raw["database"], 8)
    again = retrieval_metrics(query, database, raw["query_labels"], raw["database_labels"], ks=(1, 10, 100))
    assert again == pytest.approx(reduced, abs=1e-6)
    assert reduced != full


def test_missing_benchmark_folder_names_the_file(tmp_path):
    cfg = compose_config(
        "evaluate.yaml",
        ["extractor=pixels", "benchmark=wikiart", f"paths.data_dir={tmp_path}"],
        tmp_path / "run",
    )
    with pytest.raises(Exception, match="wikiart.csv.*does not exist"):  # Hydra wraps it, message intact
        evaluate(cfg)


@pytest.mark.slow
def test_csd_checkpoint_scores_like_its_training_run(data_dir, tmp_path):
    run = tmp_path / "run"
    trained = train(
        compose_config(
            "train.yaml",
            ["experiment=csd_quickstart", *tiny_overrides(data_dir), "eval_before_training=false"],
            run,
        )
    )
    cfg = compose_config(
        "evaluate.yaml",
        [
            "extractor=csd",
            f"extractor.checkpoint={run / 'checkpoints' / 'last.ckpt'}",
            *bench_overrides(data_dir),
        ],
        tmp_path / "eval",
    )
    metrics = evaluate(cfg)
    for key in ("mAP@1", "mAP@10", "recall@10"):
        assert metrics[key] == pytest.approx(trained[f"test/{key}"], abs=1e-6), key
    # Real CSD embeddings: the bf16 search with exact re-ranking returns float32's top 100, in order.
    saved = load_embeddings(tmp_path / "eval" / "embeddings.npz")
    query, database = saved["query"], saved["database"]
    k = min(100, len(database))
    float32 = search_topk(query, database, k, backend="torch", precision="float32")
    _, indices, stats = bf16_rerank_topk(query, database, k)
    assert torch.equal(indices, float32[1]) and stats["queries"] == len(query)
    labels = (saved["query_labels"], saved["database_labels"])
    assert retrieval_metrics(query, database, *labels, precision="bf16_rerank") == retrieval_metrics(
        query, database, *labels, precision="float32"
    )
