"""The feature store: sharded extraction by parts (and under 2-process DDP), resume, checks against the manifest,
and exact / sampled / approximate search over it against the in-memory engine."""

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.metrics.replication import train_background
from src.metrics.search import search_topk
from src.nn.extractors import PixelExtractor
from src.replication.features import extract_folder
from src.replication.store import FeatureStore, StoreError, extract_store
from src.replication.store_search import approximate_search, search_store, store_background


def write_images(folder, count, seed=0, size=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture
def folder(tmp_path):
    folder = write_images(tmp_path / "images", 20)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_parts_extract_disjoint_shards_and_the_last_one_writes_the_manifest(folder, tmp_path):
    extractor = PixelExtractor(8)
    store_dir = tmp_path / "store"
    first = extract_store(extractor, folder, store_dir, shard_size=6, part=0, parts=2, dtype="float32")
    assert first is None and not (store_dir / "manifest.json").exists()  # shards 1 and 3 left to part 1
    store = extract_store(extractor, folder, store_dir, shard_size=6, part=1, parts=2, dtype="float32")
    assert len(store.shards) == 4 and len(store) == 20 and store.dim == 3 * 8 * 8
    assert [s["path"] for s in store.skipped] == ["broken.png"]
    reference = extract_folder(extractor, folder)
    assert store.paths == reference.paths
    torch.testing.assert_close(store.features(), reference.features, rtol=0, atol=0)
    torch.testing.assert_close(store.rows_at([19, 0, 7]), reference.features[[19, 0, 7]], rtol=0, atol=0)

    # A second run of a part finds its shards done and extracts nothing.
    written = {p.name: p.stat().st_mtime_ns for p in (store_dir / "shards").iterdir()}
    again = extract_store(extractor, folder, store_dir, shard_size=6, part=0, parts=2, dtype="float32")
    assert len(again) == 20
    assert {p.name: p.stat().st_mtime_ns for p in (store_dir / "shards").iterdir()} == written


def test_a_store_that_does_not_match_its_manifest_is_refused_naming_the_shard(folder, tmp_path):
    extractor = PixelExtractor(8)
    store_dir = tmp_path / "store"
    extract_store(extractor, folder, store_dir, shard_size=8)
    shard = store_dir / "shards" / "00001.npy"
    content = shard.read_bytes()
    shard.write_bytes(content[:-10])
    with pytest.raises(StoreError, match="shard 00001 has .* bytes.*truncated"):
        FeatureStore(store_dir)
    shard.write_bytes(content)
    sidecar = store_dir / "shards" / "00001.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(meta | {"key": "another"}))
    with pytest.raises(StoreError, match="shard 00001 was written under another key"):
        FeatureStore(store_dir)
    sidecar.write_text(json.dumps(meta))
    changed = np.load(shard).copy()
    changed[0, 0] += 1
    np.save(shard, changed)
    FeatureStore(store_dir)  # same size: only the hash tells
    with pytest.raises(StoreError, match="shard 00001 does not match its sha256"):
        FeatureStore(store_dir, verify="hash")
    shard.unlink()
    with pytest.raises(StoreError, match="shard 00001 is missing"):
        FeatureStore(store_dir)
    # Another extractor writing into the same folder is refused, not mixed in.
    with pytest.raises(StoreError, match="another key"):
        extract_store(PixelExtractor(4), folder, store_dir, shard_size=8)
    with pytest.raises(StoreError, match="no manifest.json"):
        FeatureStore(tmp_path)


def test_store_search_equals_the_in_memory_engine(folder, tmp_path):
    extractor = PixelExtractor(8)
    store = extract_store(extractor, folder, tmp_path / "store", shard_size=7, dtype="float32")
    train = store.features()
    query = torch.nn.functional.normalize(
        torch.randn(9, store.dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    query[3] = train[11]  # an exact copy
    expected = search_topk(query, train, 4, backend="torch")
    for block_rows in (3, 7, 100):  # blocks inside shards, whole shards, more than a shard
        for backend in ("torch", "faiss"):
            found = search_store(query, store, 4, chunk_size=4, block_rows=block_rows, backend=backend)
            torch.testing.assert_close(found[0], expected[0])
            assert torch.equal(found[1], expected[1])
    assert found[1][3, 0] == 11
    # The background over the store, whole or sampled, equals the in-memory background on its rows.
    sims, nearest = train_background(train)
    rows, s, n = store_background(store, query_rows=5, block_rows=4)
    assert torch.equal(rows, torch.arange(20)) and torch.equal(n, nearest)
    torch.testing.assert_close(s, sims)
    exclude = torch.arange(20)
    for block_rows in (1, 2, 20):  # a block of one row holds nothing but the excluded row for one query
        found = search_store(train, store, 3, block_rows=block_rows, exclude=exclude, backend="faiss")
        expected = search_topk(train, train, 3, exclude_self=True, backend="torch")
        torch.testing.assert_close(found[0], expected[0])
        assert torch.equal(found[1], expected[1])
    rows, s, n = store_background(store, anchors=6, seed=1)
    assert len(rows) == 6 and torch.equal(n, nearest[rows])
    with pytest.raises(StoreError, match="query features have 5 dims and store .* has 192"):
        search_store(torch.ones(2, 5), store)
    with pytest.raises(MemoryError, match="chunk_size=1000000 and block_rows=10000000 need about .* GiB"):
        search_store(query, store, chunk_size=10**6, block_rows=10**7)


def test_a_float16_store_scores_within_half_precision(folder, tmp_path):
    store = extract_store(PixelExtractor(8), folder, tmp_path / "store", shard_size=7)
    assert (
        store.dtype == "float16" and np.load(tmp_path / "store" / "shards" / "00000.npy").dtype == np.float16
    )
    train = store.features()
    scores, indices = search_store(train[:5], store, 1, exclude=torch.arange(5))
    expected, _ = train_background(train)
    torch.testing.assert_close(scores[:, 0], expected[:5], atol=1e-6, rtol=0)


def test_webdataset_shards_are_one_store_shard_each_and_samples_without_an_image_are_counted(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(0)
    tars = []
    for t in range(2):
        path = tmp_path / f"shard-{t:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(5):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                sink.write({"__key__": f"{t}_{i}", "jpg": buffer.getvalue(), "txt": "a caption"})
            sink.write({"__key__": f"{t}_text_only", "txt": "no image"})
            sink.write({"__key__": f"{t}_broken", "jpg": b"not a jpeg"})
        tars.append(path)
    pattern = str(tmp_path / "shard-{00000..00001}.tar")
    store = extract_store(PixelExtractor(8), pattern, tmp_path / "store")
    assert len(store.shards) == 2 and len(store) == 10
    assert store.paths[:5] == [f"0_{i}" for i in range(5)]
    assert sorted(s["path"] for s in store.skipped) == ["0_broken", "0_text_only", "1_broken", "1_text_only"]
    assert store.manifest["source"]["kind"] == "webdataset" and store.manifest["skipped"] == 4
    # the command line takes the brace pattern quoted (Hydra would read {..} as a dictionary)
    from tests.conftest import compose_config

    cfg = compose_config("extract.yaml", [f"source='{pattern}'", "store=x"], tmp_path / "cfg")
    assert cfg.source == pattern
    with pytest.raises(FileNotFoundError, match="1 of 3 webdataset shards do not exist"):
        extract_store(PixelExtractor(8), [*map(str, tars), str(tmp_path / "gone.tar")], tmp_path / "s2")


def test_approximate_search_re_scores_its_candidates_and_reports_recall(tmp_path):
    folder = write_images(tmp_path / "images", 60, size=8)
    store = extract_store(PixelExtractor(8), folder, tmp_path / "store", shard_size=25, dtype="float32")
    query = store.features()[::3] + 0.01
    query = torch.nn.functional.normalize(query, dim=1)
    scores, indices, info = approximate_search(query, store, "IVF4,Flat", k=2, nprobe=4, recall_queries=10)
    expected_scores, expected = search_store(query, store, 2)
    assert info["recall_at_1"] == 1.0 and info["recall_queries"] == 10  # every list visited: exact
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, expected_scores)
    assert len(list((tmp_path / "store" / "index").glob("IVF4,Flat_*.faiss"))) == 1


def test_the_extract_entry_writes_a_store_that_the_replication_report_searches(folder, tmp_path):
    from src.extract import extract
    from src.replicate import replicate
    from tests.conftest import compose_config

    generated = write_images(tmp_path / "generated", 4, seed=5)
    (generated / "copy.png").write_bytes((folder / "007.png").read_bytes())
    common = ["extractor=pixels", "extractor.size=8", "device=cpu", "num_workers=0", "batch_size=4"]
    store_dir = tmp_path / "store"
    for part in (0, 1):
        overrides = [
            *common,
            f"source={folder}",
            f"store={store_dir}",
            "shard_size=8",
            f"part={part}",
            "parts=2",
        ]
        done = extract(compose_config("extract.yaml", overrides, tmp_path / f"extract{part}"))
        assert (done is None) == (part == 0)
    report_overrides = [
        *common,
        f"generated={generated}",
        f"train_store={store_dir}",
        f"paths.data_dir={tmp_path}",
    ]
    stats = replicate(
        compose_config("replicate.yaml", [*report_overrides, "threshold=0.99"], tmp_path / "exact")
    )
    report = json.loads((tmp_path / "exact" / "report.json").read_text())
    assert report["train_cache"] == "store" and report["counts"]["train"] == 20
    assert report["background_rows"] == 20 and stats["sim_gt_thr"] == pytest.approx(1 / 5)
    assert (tmp_path / "exact" / "gallery.png").is_file()  # the store's source folder serves the images
    # The same figures as extracting the folder itself
    folder_stats = replicate(
        compose_config(
            "replicate.yaml",
            [*report_overrides[:-2], f"train={folder}", f"paths.data_dir={tmp_path}", "threshold=0.99"],
            tmp_path / "folder",
        )
    )
    for key in ("sim_95pc", "sim_mean", "bg_mean", "bg_95pc"):
        assert stats[key] == pytest.approx(folder_stats[key], abs=1e-3)  # float16 store against float32
    sampled = replicate(
        compose_config("replicate.yaml", [*report_overrides, "background_anchors=5"], tmp_path / "sampled")
    )
    assert json.loads((tmp_path / "sampled" / "report.json").read_text())["background_rows"] == 5
    assert sampled["sim_95pc"] == stats["sim_95pc"]
    with pytest.raises(StoreError, match="holds features of pixels8 .* runs pixels16"):
        replicate(
            compose_config(
                "replicate.yaml",
                [*report_overrides[:1], *report_overrides[2:], "extractor.size=16"],
                tmp_path / "other",
            )
        )


# ---- 2-process CPU DDP (gloo), one process group for three checks (each spawn costs two interpreters) ----


class _Strategy:
    def barrier(self):
        torch.distributed.barrier()


class _Trainer:
    """The attributes of a Lightning trainer that ReplicationAnalysis and `for_ranks` read, on a rank."""

    def __init__(self, root, datamodule):
        self.global_rank, self.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.is_global_zero, self.sanity_checking, self.global_step = self.global_rank == 0, False, 7
        self.default_root_dir, self.datamodule, self.strategy = root, datamodule, _Strategy()
        self.loggers, self.callback_metrics = [], {}


def ddp_checks(rank, init_file, folder, root):
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors.data_connector import (
        _get_distributed_sampler,
        _update_dataloader,
    )
    from torch.utils.data import DataLoader

    from src.callbacks.diffusion import ReplicationAnalysis
    from src.data.images import EpochRandomSampler, ImageListDataset, collate_skip_none, for_ranks
    from tests.test_diffusion import tiny_module

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        root = Path(root)
        # 1. feature extraction: the ranks extract disjoint shards, rank 0 writes the manifest, both get the store
        store = extract_store(PixelExtractor(8), folder, root / "store", shard_size=5, dtype="float32")
        assert len(store) == 20

        # 2. the training loader as Lightning's trainer rebuilds it under DDP
        paths = sorted(p.name for p in Path(folder).iterdir())  # 20 images and broken.png
        names = paths[:-1]
        trainer = _Trainer(str(root / "run"), None)
        dataset = for_ranks(ImageListDataset(folder, paths, PixelExtractor(8).transform()), trainer)
        loader = DataLoader(
            dataset, batch_size=4, sampler=EpochRandomSampler(len(paths), 21), collate_fn=collate_skip_none
        )
        sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank)
        loader = _update_dataloader(loader, sampler)
        loader.sampler.set_epoch(0)
        sizes = [len(b["index"]) for b in loader]
        torch.save({"sizes": sizes, "draws": list(loader.sampler)}, root / f"loader{rank}.pt")

        # 3. the end-of-training analysis: every rank generates its index range, rank 0 analyses
        trainer.datamodule = SimpleNamespace(
            root=folder, train_files=names[:12], control_files=names[12:], hparams={}
        )
        callback = ReplicationAnalysis(PixelExtractor(8), num_images=6, steps=2, batch_size=2)
        callback.on_fit_end(trainer, tiny_module())
        if rank == 0:
            assert "replication/train/sim_95pc" in trainer.callback_metrics
    finally:
        torch.distributed.destroy_process_group()


def test_extraction_the_training_loader_and_the_analysis_under_two_process_ddp(folder, tmp_path):
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(
            ddp_checks, args=(os.path.join(tmp, "init"), str(folder), str(tmp_path)), nprocs=2, join=True
        )
    # 1. one store, five shards, the same rows as one process's extraction
    store = FeatureStore(tmp_path / "store", verify="hash")
    reference = extract_folder(PixelExtractor(8), folder)
    assert len(store.shards) == 5 and store.paths == reference.paths
    torch.testing.assert_close(store.features(), reference.features, rtol=0, atol=0)
    # 2. samples_per_epoch = 21 draws (every image, broken.png included), 11 per rank (the sampler pads one):
    # full batches, broken.png replaced by a readable image and never skipped; the ranks share one epoch's draws
    loaders = [torch.load(tmp_path / f"loader{rank}.pt") for rank in range(2)]
    assert [result["sizes"] for result in loaders] == [[4, 4, 3], [4, 4, 3]]
    draws = loaders[0]["draws"] + loaders[1]["draws"]
    assert len(draws) == 22 and len(set(draws)) == 21
    # 3. each rank generated its half of the images; rank 0 then found them all and analysed
    samples = tmp_path / "run" / "samples" / "final"
    assert len(list(samples.glob("*.png"))) == 6
    assert sorted(p.name for p in samples.glob("timing*.json")) == [
        "timing_part0of2.json",
        "timing_part1of2.json",
    ]
    assert json.loads((tmp_path / "run" / "replication" / "summary.json").read_text())["num_generated"] == 6


def test_row_names_are_read_shard_by_shard(folder, tmp_path):
    store = extract_store(PixelExtractor(8), folder, tmp_path / "store", shard_size=3, dtype="float32")
    names = sorted(p.name for p in folder.glob("0*.png"))
    paths = store.paths
    assert len(paths) == 20 and paths[0] == names[0] and paths[-1] == names[-1] and paths[7:9] == names[7:9]
    assert [paths[i] for i in (19, 2, 11, 2)] == [names[i] for i in (19, 2, 11, 2)]
    assert len(paths._cache) <= paths.KEEP and list(paths) == names and paths == names
    with pytest.raises(IndexError, match="row 20 of a store of 20 rows"):
        paths[20]
