"""The procedural style filters and the embedded style benchmark built from them (tiny sizes, no downloads)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.embedded import style_bench
from src.data.embedded.style_bench import SPLITS, assign_photos, build_style_bench, load_photo, split_sizes
from src.data.embedded.styles import PALETTES, STYLE_TAGS, STYLES, stylize


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 64x64 crop of a shipped photograph, float32 (H, W, 3) in [0, 1]."""
    image = Image.fromarray(load_photo("astronaut")[0:256, 128:384]).resize((64, 64), Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0


@pytest.mark.parametrize("style", list(STYLES))
def test_filter_shape_range_and_determinism(style, photo):
    out = STYLES[style](photo, np.random.default_rng(3))
    assert out.shape == photo.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, STYLES[style](photo, np.random.default_rng(3)))
    assert not np.array_equal(out, STYLES[style](photo, np.random.default_rng(4)))
    # Sizes other than the 96 px the strokes are tuned for still work.
    assert STYLES[style](np.ascontiguousarray(photo[:40, :56]), np.random.default_rng(0)).shape == (40, 56, 3)


def test_styles_differ_from_each_other_and_from_the_input(photo):
    palette = PALETTES["sepia"]  # one palette for all, so only the styles' strokes and textures differ
    outs = {name: fn(photo, np.random.default_rng(0), palette) for name, fn in STYLES.items()}
    for name, out in outs.items():
        assert np.abs(out - photo).mean() > 0.05, f"{name} barely changes the photo"
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(outs[a] - outs[b]).mean() > 0.02, f"{a} and {b} render the same image"


def test_registry_tags_and_errors(photo):
    assert len(STYLES) >= 12 and set(STYLE_TAGS) == set(STYLES)
    # Medium tags are shared by several styles (multi-label training), never unique to one.
    mediums = [t for tags in STYLE_TAGS.values() for t in tags if t.startswith("medium:")]
    assert all(mediums.count(m) >= 2 for m in {"medium:print", "medium:ink", "medium:paint"})
    out, tags = stylize(photo, "halftone", np.random.default_rng(0))
    assert out.shape == photo.shape
    assert tags[0] == "style:halftone" and tags[-1].removeprefix("palette:") in PALETTES
    with pytest.raises(ValueError, match="float32"):
        STYLES["oil"](photo.astype(np.float64), np.random.default_rng(0))
    with pytest.raises(KeyError, match="unknown style 'cubism'"):
        stylize(photo, "cubism", np.random.default_rng(0))
    with pytest.raises(ValueError, match="palette"):
        STYLES["oil"](photo, np.random.default_rng(0), np.zeros((4, 4)))


def test_photo_groups_are_disjoint_and_split_sizes():
    for seed in range(5):
        groups = assign_photos(seed)
        assert all(groups[split] for split in SPLITS)
        assert not set(groups["query"]) & (set(groups["train"]) | set(groups["database"]))
        assert not set(groups["train"]) & set(groups["database"])
    assert assign_photos(0) != assign_photos(1)
    assert split_sizes(250) == {"train": 163, "database": 62, "query": 25}
    with pytest.raises(ValueError, match="images_per_style"):
        split_sizes(2)


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_style_bench(
        tmp_path_factory.mktemp("bench"), seed=0, image_size=48, images_per_style=6, num_workers=0
    )


def test_tiny_build_writes_consistent_csvs(tiny):
    assert tiny.name == "style_bench_s0_px48_n6_v1"
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["styles"] == list(STYLES)
    assert meta["counts"] == {"train": 3 * len(STYLES), "database": 2 * len(STYLES), "query": len(STYLES)}
    train, retrieval, images = (
        _read(tiny / "train.csv"),
        _read(tiny / "retrieval.csv"),
        _read(tiny / "images.csv"),
    )
    assert list(train[0]) == ["path", "tags"] and list(retrieval[0]) == ["path", "label", "split"]
    assert len(train) == meta["counts"]["train"] and len(images) == sum(meta["counts"].values())
    # Every listed file exists, every image is listed once, and each is a 48x48 RGB PNG.
    pngs = sorted(str(p.relative_to(tiny)) for p in tiny.rglob("*.png"))
    assert sorted(r["path"] for r in train + retrieval) == pngs == sorted(r["path"] for r in images)
    assert Image.open(tiny / pngs[0]).size == (48, 48) and Image.open(tiny / pngs[0]).mode == "RGB"
    for row in train:
        tags = row["tags"].split("|")
        style = row["path"].split("/")[2]
        assert (
            tags[0] == f"style:{style}"
            and tags[1:-1] == STYLE_TAGS[style]
            and tags[-1].startswith("palette:")
        )
    for row in retrieval:
        assert row["path"].split("/")[1:3] == [row["split"], row["label"]]
    for split in SPLITS:  # every style in every split, in equal numbers
        styles = [r["style"] for r in images if r["split"] == split]
        assert {s: styles.count(s) for s in STYLES} == dict.fromkeys(STYLES, meta["counts_per_style"][split])


def test_no_query_photo_in_train_or_database(tiny):
    meta = json.loads((tiny / "meta.json").read_text())
    groups = {split: set(meta["source_photos"][split]) for split in SPLITS}
    assert not groups["query"] & (groups["train"] | groups["database"])
    for row in _read(tiny / "images.csv"):
        assert row["source"] in groups[row["split"]]


def test_build_is_deterministic_and_seeded(tiny, tmp_path):
    # Same seed, other folder, two worker processes: byte-identical files.
    again = build_style_bench(tmp_path / "a", seed=0, image_size=48, images_per_style=6, num_workers=2)
    assert _files(again) == _files(tiny)
    other = build_style_bench(tmp_path / "b", seed=1, image_size=48, images_per_style=6, num_workers=0)
    a, b = _files(tiny), _files(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) > 0.9 * sum(k.endswith(".png") for k in a)


def test_complete_build_is_reused_not_rewritten(tmp_path):
    kwargs = dict(seed=0, image_size=48, images_per_style=3, num_workers=0)
    folder = build_style_bench(tmp_path, **kwargs)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert build_style_bench(tmp_path, **kwargs) == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes
    build_style_bench(tmp_path, force=True, **kwargs)
    assert (folder / "meta.json").stat().st_mtime_ns != mtimes[folder / "meta.json"]
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folders left


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    calls = []
    render = style_bench._render

    def crash_after_ten(job):
        calls.append(job)
        if len(calls) > 10:
            raise KeyboardInterrupt
        return render(job)

    monkeypatch.setattr(style_bench, "_render", crash_after_ten)
    with pytest.raises(KeyboardInterrupt):
        build_style_bench(tmp_path, seed=0, image_size=48, images_per_style=3, num_workers=0)
    assert list(tmp_path.iterdir()) == []
    # A folder without meta.json is not taken for a complete build.
    (tmp_path / "style_bench_s0_px48_n3_v1" / "images").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="no meta.json"):
        build_style_bench(tmp_path, seed=0, image_size=48, images_per_style=3, num_workers=0)
