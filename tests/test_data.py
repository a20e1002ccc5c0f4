"""Data pipeline: image reading, annotations, tag vocabulary, views, webdataset streaming, retrieval sets
and the CSD data module, on tiny files written in tmp_path."""

import io
import json
import logging
from inspect import signature
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from src.data.images import (
    IMAGE_EXTENSIONS,
    ImageListDataset,
    UnreadableImage,
    build_atomically,
    collate_skip_none,
    image_batches,
    list_images,
    load_rgb,
    read_list,
)
from src.data.style.datamodule import StyleDataModule
from src.data.style.multilabel import (
    StyleFolderDataset,
    TagVocabulary,
    read_annotations,
    style_webdataset,
)
from src.data.style.retrieval import (
    RetrievalSet,
    load_domainnet,
    load_retrieval_csv,
    load_wikiart,
)
from src.data.style.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    MultiView,
    csd_views,
    eval_transform,
    photometric_view_transform,
    style_view_transform,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "data"


def save_png(path: Path, color=(200, 30, 60), size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color, size=(40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def odd_images(tmp_path) -> dict[str, Path]:
    """One file per awkward case: grayscale, RGBA, palette, 16-bit, corrupt, truncated."""
    folder = tmp_path / "odd"
    folder.mkdir()
    paths = {}
    Image.new("L", (8, 8), 100).save(paths.setdefault("gray", folder / "gray.png"))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    rgba.save(paths.setdefault("rgba", folder / "rgba.png"))
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P").save(
        paths.setdefault("palette", folder / "palette.png")
    )
    sixteen = np.full((8, 8), 65535, dtype=np.uint16)
    sixteen[0, 0] = 32896  # 32896 / 257 = 128
    Image.fromarray(sixteen).save(paths.setdefault("sixteen", folder / "sixteen.png"))
    paths["corrupt"] = folder / "corrupt.jpg"
    paths["corrupt"].write_bytes(b"this is not an image" * 10)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    paths["truncated"] = folder / "truncated.jpg"
    paths["truncated"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return paths


def test_load_rgb_converts_every_mode_to_8bit_rgb(odd_images):
    gray = np.asarray(load_rgb(odd_images["gray"]))
    assert gray.dtype == np.uint8 and gray.shape == (8, 8, 3) and (gray == 100).all()
    rgba = np.asarray(load_rgb(odd_images["rgba"]))
    assert (rgba[1, 1] == 255).all(), "transparent pixels are composited on white"
    assert tuple(rgba[0, 0]) == (0, 0, 255)
    palette = np.asarray(load_rgb(odd_images["palette"]))
    assert palette.shape == (8, 8, 3) and abs(int(palette[0, 0, 1]) - 200) < 10
    sixteen = np.asarray(load_rgb(odd_images["sixteen"]))
    assert sixteen.dtype == np.uint8 and (sixteen[1, 1] == 255).all() and (sixteen[0, 0] == 128).all()


@pytest.mark.parametrize("case", ["corrupt", "truncated", "missing"])
def test_load_rgb_raises_unreadable_image_naming_the_file(odd_images, case):
    path = odd_images.get(case, odd_images["gray"].parent / "missing.png")
    with pytest.raises(UnreadableImage, match=path.name) as error:
        load_rgb(path)
    assert error.value.path == str(path)


def test_list_images_is_sorted_recursive_and_explains_failures(tmp_path):
    save_png(tmp_path / "b" / "z.PNG")
    save_png(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.jpg", "b/z.PNG"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no image file.*\.jpg"):
        list_images(tmp_path / "empty")
    assert ".png" in IMAGE_EXTENSIONS


def test_read_list_reads_txt_json_lists_and_a_key_of_an_object(tmp_path):
    (tmp_path / "a.txt").write_text(" x.png \n\nsub/y.png\n")
    (tmp_path / "b.json").write_text(json.dumps(["x.png"]))
    (tmp_path / "c.json").write_text(json.dumps({"train": ["x.png"], "control": ["z.png"]}))
    assert read_list(tmp_path / "a.txt") == ["x.png", "sub/y.png"]
    assert read_list(tmp_path / "b.json") == ["x.png"]
    assert read_list(tmp_path / "c.json", "control") == ["z.png"]
    with pytest.raises(KeyError, match="'held_out'.*keys: \\['control', 'train'\\]"):
        read_list(tmp_path / "c.json", "held_out")
    with pytest.raises(ValueError, match="holds a JSON object; expected a JSON list"):
        read_list(tmp_path / "c.json")


def test_read_list_errors_name_the_file_and_the_line_or_entry(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_list(tmp_path / "missing.txt")
    (tmp_path / "bad.json").write_text('[\n  "x.png",\n  oops\n]')
    with pytest.raises(ValueError, match="bad.json', line 3 column 3: not valid JSON"):
        read_list(tmp_path / "bad.json")
    (tmp_path / "mixed.json").write_text(json.dumps(["x.png", 3]))
    with pytest.raises(ValueError, match="mixed.json', entry 1: 3 is not a non-empty string"):
        read_list(tmp_path / "mixed.json")
    (tmp_path / "object.json").write_text(json.dumps({"train": "x.png"}))
    with pytest.raises(ValueError, match="must hold a JSON list of strings, not str"):
        read_list(tmp_path / "object.json", "train")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt' holds no entry"):
        read_list(tmp_path / "empty.txt")


def test_build_atomically_builds_once_and_never_reuses_an_interrupted_build(tmp_path):
    calls = []

    def write(folder):
        calls.append(folder)
        (folder / "data.txt").write_text("x")
        return {"count": 1}

    folder = build_atomically(tmp_path, "set_v1", write)
    assert (folder / "data.txt").read_text() == "x" and json.loads((folder / "meta.json").read_text()) == {
        "count": 1
    }
    assert build_atomically(tmp_path, "set_v1", write) == folder and len(calls) == 1  # reused
    build_atomically(tmp_path, "set_v1", write, force=True)
    assert len(calls) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["set_v1"]  # no temporary left

    def crash(folder):
        (folder / "half.txt").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_atomically(tmp_path, "other_v1", crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set_v1"]
    (tmp_path / "other_v1").mkdir()
    with pytest.raises(RuntimeError, match="no meta.json"):
        build_atomically(tmp_path, "other_v1", write)
    stale = tmp_path / ".set_v2.tmp-999999999-0000abcd"  # the temporary folder of a process that is gone
    stale.mkdir()
    build_atomically(tmp_path, "set_v2", write)
    assert not stale.exists()


def test_read_annotations_csv_and_jsonl_agree(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text("path,tags\nx.png,monet|impressionism\ny.png,\n")
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text(
        json.dumps({"path": "x.png", "tags": ["monet", "impressionism"]})
        + "\n\n"
        + json.dumps({"path": "y.png", "tags": []})
        + "\n"
    )
    expected = [("x.png", ["monet", "impressionism"]), ("y.png", [])]
    assert read_annotations(csv_path) == expected
    assert read_annotations(jsonl_path) == expected


def test_read_annotations_errors_name_file_and_line(tmp_path):
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("file,labels\nx.png,a\n")
    with pytest.raises(
        ValueError, match=r"h\.csv', line 1: expected a header with columns 'path' and 'tags'"
    ):
        read_annotations(bad_header)
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text(json.dumps({"path": "x.png", "tags": ["a"]}) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"b\.jsonl', line 2"):
        read_annotations(bad_json)
    bad_tags = tmp_path / "t.jsonl"
    bad_tags.write_text(json.dumps({"path": "x.png", "tags": "a|b"}) + "\n")
    with pytest.raises(ValueError, match="line 1: 'tags' is not a list of strings"):
        read_annotations(bad_tags)
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        read_annotations(tmp_path / "a.txt")


def test_tag_vocabulary_filters_by_image_count(tmp_path, caplog):
    tag_lists = [["common", "rare"], ["common", "mid"], ["common", "mid"], ["common", "common"]]
    with caplog.at_level(logging.WARNING):
        vocab = TagVocabulary.from_tag_lists(tag_lists, min_images=2, max_images=3)
    assert vocab.tags == ["mid"] and len(vocab) == 1
    assert "dropped 1 tags used by fewer than 2 images and 1 tags used by more than 3" in caplog.text
    full = TagVocabulary.from_tag_lists(tag_lists)
    assert full.tags == ["common", "mid", "rare"] and full.counts == {"common": 4, "mid": 2, "rare": 1}
    assert full.encode(["rare", "common", "unknown"]).tolist() == [1.0, 0.0, 1.0]
    assert full.encode([]).dtype == torch.float32

    full.save(tmp_path / "tags.txt")
    assert (tmp_path / "tags.txt").read_text() == "common\t4\nmid\t2\nrare\t1\n"
    assert TagVocabulary.from_file(tmp_path / "tags.txt", min_images=2).tags == ["common", "mid"]
    (tmp_path / "plain.txt").write_text("b tag\n\na tag\n")
    assert TagVocabulary.from_file(tmp_path / "plain.txt").tags == ["b tag", "a tag"]  # file order kept
    with pytest.raises(ValueError, match="lines without a count, so min_images=2"):
        TagVocabulary.from_file(tmp_path / "plain.txt", min_images=2)
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="line 3: duplicate tag 'a'"):
        TagVocabulary.from_file(tmp_path / "dup.txt")


@pytest.fixture
def style_folder(tmp_path):
    """4 images of two styles plus an unreadable one and one with only a rare tag."""
    root = tmp_path / "train"
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    rows = ["path,tags"]
    for i in range(4):
        style = "red" if i % 2 else "blue"
        save_png(root / style / f"{i}.png", colors[style])
        rows.append(f"{style}/{i}.png,{style}|painting")
    (root / "broken.png").write_bytes(b"broken")
    rows.append("broken.png,red")
    save_png(root / "rare.png")
    rows.append("rare.png,once")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return root, tmp_path / "train.csv"


def test_style_folder_dataset_items_exclusions_and_unreadable(style_folder, caplog):
    root, annotations = style_folder
    transform = csd_views(16)
    with caplog.at_level(logging.WARNING):
        dataset = StyleFolderDataset(root, annotations, transform, min_images_per_tag=2)
    assert dataset.num_excluded == 1 and len(dataset) == 5
    assert "excluded 1 of 6 images" in caplog.text
    assert dataset.vocab.tags == ["blue", "painting", "red"]
    item = dataset[0]
    assert item["images"].shape == (2, 3, 16, 16) and item["index"] == 0
    assert item["labels"].tolist() == [1.0, 1.0, 0.0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert dataset[4] is None and dataset[4] is None
    assert caplog.text.count("broken.png") == 1, "an unreadable file is logged once"


def test_style_folder_dataset_missing_paths_name_the_config_key(style_folder, tmp_path):
    root, annotations = style_folder
    with pytest.raises(FileNotFoundError, match=r"data\.train_root: folder .* does not exist"):
        StyleFolderDataset(tmp_path / "nowhere", annotations, csd_views(16))
    with pytest.raises(
        FileNotFoundError, match=r"data\.train_annotations: .* expected a CSV with columns 'path,tags'"
    ):
        StyleFolderDataset(root, tmp_path / "missing.csv", csd_views(16))


def test_collate_skip_none_counts_skipped_items():
    item = {"image": torch.zeros(3, 4, 4), "index": 3}
    batch = collate_skip_none([None, item, item])
    assert (
        batch["image"].shape == (2, 3, 4, 4)
        and batch["index"].tolist() == [3, 3]
        and batch["num_skipped"] == 1
    )
    assert collate_skip_none([None, None]) == {"num_skipped": 2}


def test_views_shapes_and_style_views_keep_colours():
    image = Image.new("RGB", (50, 37), (180, 90, 20))
    expected = (torch.tensor([180, 90, 20]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.manual_seed(0)
    for _ in range(5):
        views = csd_views(24)(image)
        assert views.shape == (2, 3, 24, 24)
        assert torch.allclose(views, expected.view(1, 3, 1, 1).expand_as(views), atol=1e-5), (
            "no photometric change"
        )
    assert csd_views(24, content_view=True)(image).shape == (3, 3, 24, 24)
    assert eval_transform(24)(image).shape == (3, 24, 24)
    assert style_view_transform(24, rotation_degrees=90)(image).shape == (3, 24, 24)
    photometric = photometric_view_transform(24)
    outputs = [photometric(image) for _ in range(10)]
    assert any(not torch.allclose(out, expected.view(3, 1, 1).expand_as(out), atol=1e-3) for out in outputs)
    assert len(MultiView([eval_transform(8)])) == 1


def write_shards(folder: Path) -> list[str]:
    """Two shards of 6 samples; one corrupt image and one sample without a known tag."""
    import webdataset as wds

    folder.mkdir()
    urls = []
    for shard in range(2):
        url = str(folder / f"{shard:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(6):
                key = f"s{shard}_{i:03d}"
                tags = ["red"] if i % 2 else ["blue", "painting"]
                image = png_bytes((40 * i, 100, 30 * shard))
                if (shard, i) == (0, 2):
                    image = b"corrupt bytes"
                if (shard, i) == (1, 3):
                    tags = ["unknown style"]
                sink.write({"__key__": key, "png": image, "json": json.dumps({"tags": tags}).encode()})
        urls.append(url)
    return urls


def test_webdataset_streams_two_workers_without_duplicates(tmp_path, caplog):
    urls = write_shards(tmp_path / "shards")
    vocab = TagVocabulary(["blue", "painting", "red"])
    dataset = style_webdataset(urls, csd_views(16), vocab, shuffle=4, seed=0)
    loader = DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collate_skip_none)
    indices, labels = [], []
    for batch in loader:
        assert batch["images"].shape[1:] == (2, 3, 16, 16)
        indices += batch["index"].tolist()
        labels.append(batch["labels"])
    assert len(indices) == 10 and len(set(indices)) == 10, "12 samples - 1 corrupt - 1 untagged, each once"
    assert torch.cat(labels).sum(1).min() >= 1

    with caplog.at_level(logging.WARNING):
        single = list(style_webdataset(urls, csd_views(16), vocab, shuffle=0, epoch_length=13))
    assert len(single) == 13, "with_epoch repeats the shards to a fixed epoch length"
    assert "no tag in the vocabulary" in caplog.text and "skipping a webdataset sample" in caplog.text


def test_webdataset_accepts_a_brace_pattern(tmp_path):
    write_shards(tmp_path / "shards")
    pattern = str(tmp_path / "shards" / "{000000..000001}.tar")
    items = list(style_webdataset(pattern, eval_transform(8), TagVocabulary(["red"]), shuffle=0))
    assert len(items) == 5 and items[0]["images"].shape == (3, 8, 8)  # 6 "red" samples, one corrupt


@pytest.fixture
def retrieval_csv(tmp_path) -> Path:
    rows = [
        "path,label,split",
        "q/0.png,monet,query",
        "q/1.png,monet|kahlo,query",  # kahlo not in the database: the query keeps monet only
        "q/2.png,kahlo,query",  # dropped
        "d/0.png,monet,database",
        "d/1.png,klimt,database",
        "d/2.png,klimt|monet,database",
        "d/3.png,klimt,database",
    ]
    path = tmp_path / "bench" / "retrieval.csv"
    path.parent.mkdir()
    path.write_text("\n".join(rows) + "\n")
    for row in rows[1:]:
        save_png(path.parent / row.split(",")[0], (60, 60, 60))
    return path


def test_load_retrieval_csv_drops_query_labels_absent_from_database(retrieval_csv, caplog):
    with caplog.at_level(logging.WARNING):
        bench = load_retrieval_csv(retrieval_csv)
    assert bench.root == retrieval_csv.parent
    assert bench.query == ["q/0.png", "q/1.png"] and bench.num_dropped_queries == 1
    assert "dropped 1 queries" in caplog.text
    assert bench.label_names == ["klimt", "monet"]
    assert bench.query_labels.tolist() == [[False, True], [False, True]]
    assert bench.database_labels.dtype == torch.bool and bench.database_labels.shape == (4, 2)
    assert bench.database_labels[2].tolist() == [True, True]


def test_load_retrieval_csv_rejects_a_bad_split(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("path,label,split\na.png,x,database\nb.png,x,train\n")
    with pytest.raises(ValueError, match=r"r\.csv', line 3: split 'train' is not one of"):
        load_retrieval_csv(path)
    with pytest.raises(FileNotFoundError, match="expected columns path,label,split"):
        load_retrieval_csv(tmp_path / "missing.csv")


def test_load_wikiart_and_domainnet_layouts(tmp_path):
    wikiart = tmp_path / "wikiart"
    wikiart.mkdir()
    (wikiart / "wikiart.csv").write_text(
        "name,artist,genre,split\n"
        "Impressionism/a.jpg,monet,landscape,query\n"
        "Baroque/b.jpg,rubens,portrait,query\n"
        "Impressionism/c.jpg,monet,landscape,database\n"
        "Cubism/d.jpg,picasso,portrait,database\n"
    )
    bench = load_wikiart(wikiart)
    assert bench.query == ["Impressionism/a.jpg"] and bench.num_dropped_queries == 1
    assert bench.label_names == ["monet", "picasso"]
    (wikiart / "bad.csv").write_text("file,artist,split\n")
    with pytest.raises(ValueError, match="expected a column 'path' or 'name'"):
        load_wikiart(wikiart, "bad.csv")

    domainnet = tmp_path / "domainnet"
    domainnet.mkdir()
    (domainnet / "split.csv").write_text(
        "path,split\n"
        "clipart/cat/1.jpg,query\n"
        "quickdraw/cat/2.png,query\n"
        "sketch/dog/3.jpg,database\n"
        "clipart/dog/4.jpg,database\n"
    )
    bench = load_domainnet(domainnet, "split.csv")
    assert bench.query == ["clipart/cat/1.jpg"] and bench.label_names == ["clipart", "sketch"]
    assert bench.database == ["sketch/dog/3.jpg", "clipart/dog/4.jpg"]
    with pytest.raises(FileNotFoundError, match="DomainNet split file"):
        load_domainnet(domainnet, "missing.csv")


def test_subsample_is_deterministic_and_optionally_with_replacement():
    labels = torch.eye(4, dtype=torch.bool)[torch.arange(40) % 4]
    bench = RetrievalSet(
        Path("."), [f"q{i}" for i in range(40)], [f"d{i}" for i in range(40)], labels, labels, list("abcd")
    )
    first, again, other = (bench.subsample(10, 20, seed=s) for s in (1, 1, 2))
    assert first.query == again.query and first.database == again.database
    assert first.query != other.query
    assert len(first.query) == 10 and len(set(first.database)) == 20
    assert first.query_labels.tolist() == [bench.query_labels[int(p[1:])].tolist() for p in first.query]
    drawn = bench.subsample(None, 200, seed=0, replace=True)
    assert len(drawn.query) == 40 and len(drawn.database) == 200 and len(set(drawn.database)) < 200
    assert bench.subsample(None, None, seed=0).database == bench.database


def test_image_list_dataset_and_batches_skip_unreadable_files(tmp_path, caplog):
    save_png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"bad")
    save_png(tmp_path / "sub" / "ok2.png")
    paths = ["ok.png", "bad.png", "sub/ok2.png"]
    dataset = ImageListDataset(tmp_path, paths, eval_transform(8))
    assert dataset[0]["image"].shape == (3, 8, 8) and dataset[0]["index"] == 0
    with caplog.at_level(logging.WARNING):
        assert dataset[1] is None and dataset[1] is None
    assert caplog.text.count("bad.png") == 1, "an unreadable file is logged once"
    batches = list(image_batches(tmp_path, paths, eval_transform(8), batch_size=2))
    assert [index.tolist() for _, index in batches] == [[0], [2]]
    assert [tuple(images.shape) for images, _ in batches] == [(1, 3, 8, 8), (1, 3, 8, 8)]


def tiny_module(style_folder, retrieval_csv, **overrides) -> StyleDataModule:
    root, annotations = style_folder
    settings = dict(
        train_format="folder",
        train_root=str(root),
        train_annotations=str(annotations),
        val_format="csv",
        val_csv=str(retrieval_csv),
        image_size=16,
        batch_size=2,
        eval_batch_size=4,
        num_workers=0,
        pin_memory=False,
    )
    return StyleDataModule(**{**settings, **overrides})


def test_datamodule_on_a_folder_and_csv_yields_documented_batches(style_folder, retrieval_csv):
    datamodule = tiny_module(
        style_folder, retrieval_csv, val_max_queries=1, val_max_database=3, test_full=True
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.num_tags == 4  # blue, once, painting, red
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 3, "6 items, batch 2, drop_last"
    for batch in batches:
        assert isinstance(batch["num_skipped"], int)
        if "images" in batch:
            n = batch["images"].shape[0]
            assert batch["images"].shape == (n, 2, 3, 16, 16) and batch["labels"].shape == (n, 4)
            assert batch["labels"].dtype == torch.float32 and batch["index"].shape == (n,)
    assert sum(b["num_skipped"] for b in batches) == 1, "broken.png is skipped once per epoch"

    val = datamodule.val_set
    assert (val.num_queries, val.num_database) == (1, 3)
    val_batches = list(datamodule.val_dataloader())
    assert val_batches[0]["image"].shape == (4, 3, 16, 16)
    assert torch.cat([b["index"] for b in val_batches]).tolist() == [0, 1, 2, 3]
    assert datamodule.test_set.num_queries == 2 and datamodule.test_set.num_database == 4
    assert sum(len(b["index"]) for b in datamodule.test_dataloader()) == 6

    subsampled_test = tiny_module(style_folder, retrieval_csv, val_max_queries=1, test_full=False)
    subsampled_test.setup("test")
    assert subsampled_test.test_set is subsampled_test.val_set and subsampled_test.train_dataset is None


def test_datamodule_builds_the_style_bench_lazily(monkeypatch, style_folder, retrieval_csv):
    """train_format=style_bench reads train.csv and retrieval.csv from the folder build_style_bench returns."""
    import src.data.embedded.style_bench

    root, annotations = style_folder
    (root / "train.csv").write_text(annotations.read_text())
    (root / "retrieval.csv").write_text(retrieval_csv.read_text())
    for path in retrieval_csv.parent.rglob("*.png"):
        save_png(root / path.relative_to(retrieval_csv.parent))
    calls = []
    monkeypatch.setattr(
        src.data.embedded.style_bench, "build_style_bench", lambda bench_root, **kw: calls.append(kw) or root
    )
    datamodule = StyleDataModule(
        bench_root=str(root.parent), image_size=16, batch_size=2, num_workers=0, bench_seed=3
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert (
        calls[0]["seed"] == 3 and len(datamodule.train_dataset) == 6 and datamodule.val_set.num_queries == 2
    )


def test_datamodule_errors_name_the_config_key(style_folder, retrieval_csv, tmp_path):
    with pytest.raises(ValueError, match="data.train_format='images'"):
        StyleDataModule(train_format="images")
    with pytest.raises(FileNotFoundError, match=r"data\.train_root"):
        tiny_module(style_folder, retrieval_csv, train_root=str(tmp_path / "nowhere")).setup("fit")
    too_big = tiny_module(style_folder, retrieval_csv, batch_size=7)
    too_big.setup("fit")
    with pytest.raises(ValueError, match=r"data\.batch_size=7 is larger than the 6 training images"):
        too_big.train_dataloader()
    with pytest.raises(ValueError, match=r"data\.val_csv is not set"):
        tiny_module(style_folder, retrieval_csv, val_csv=None).setup("fit")
    with pytest.raises(ValueError, match=r"data\.vocab_file is not set"):
        StyleDataModule(train_format="webdataset", train_shards="x.tar", val_format="csv").setup("fit")
    with pytest.raises(FileNotFoundError, match="WikiArt annotation"):
        tiny_module(
            style_folder, retrieval_csv, val_format="wikiart", val_root=str(tmp_path), val_csv=None
        ).setup("test")


def test_datamodule_trains_from_webdataset_shards(tmp_path, retrieval_csv):
    urls = write_shards(tmp_path / "shards")
    (tmp_path / "tags.txt").write_text("blue\npainting\nred\n")
    datamodule = StyleDataModule(
        train_format="webdataset",
        train_shards=urls,
        vocab_file=str(tmp_path / "tags.txt"),
        epoch_length=8,
        val_format="csv",
        val_csv=str(retrieval_csv),
        image_size=16,
        batch_size=4,
        num_workers=0,
        pin_memory=False,
    )
    datamodule.setup("fit")
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 2, 3, 16, 16) and datamodule.num_tags == 3


@pytest.mark.parametrize("name", ["style_bench", "laion_styles", "style_folder"])
def test_data_configs_match_the_datamodule(name):
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert cfg._target_ == "src.data.style.datamodule.StyleDataModule"
    unknown = set(cfg.keys()) - {"_target_", "_convert_"} - set(signature(StyleDataModule).parameters)
    assert not unknown, f"{name}.yaml has keys the datamodule does not take: {unknown}"


def test_datamodule_on_the_real_style_bench(tmp_path):
    """The wiring to src.data.embedded.style_bench at a tiny size: its train.csv and retrieval.csv read as documented."""
    datamodule = StyleDataModule(
        bench_root=str(tmp_path),
        bench_image_size=32,
        bench_images_per_style=4,
        image_size=16,
        batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        pin_memory=False,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["images"].shape == (4, 2, 3, 16, 16) and batch["labels"].shape == (4, datamodule.num_tags)
    assert datamodule.val_set.num_queries > 0 and datamodule.val_set.database_labels.any(1).all()
    assert next(iter(datamodule.val_dataloader()))["image"].shape[1:] == (3, 16, 16)
