"""Nested seeded subsets of an image folder, the held-out control set, and the embedded faces."""

import numpy as np
import pytest
from PIL import Image

from src.data.diffusion.image_folder import ImageFolderDataModule, select_subsets
from src.data.embedded.faces import build_embedded_faces


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 small PNGs in two subfolders plus one corrupt file."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for i in range(40):
        (root / f"part{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            root / f"part{i % 2}" / f"{i}.png"
        )
    (root / "part0" / "broken.png").write_bytes(b"not a png")
    return root


def test_subsets_are_nested_stable_and_disjoint_from_the_control(folder):
    subsets = {n: select_subsets(folder, n, control_size=8, seed=3) for n in (5, 10, 30)}
    assert subsets[5]["train"] == subsets[10]["train"][:5]
    assert subsets[10]["train"] == subsets[30]["train"][:10]
    assert select_subsets(folder, 10, control_size=8, seed=3) == subsets[10]  # stable across calls
    assert select_subsets(folder, 10, control_size=8, seed=4)["train"] != subsets[10]["train"]
    for n, index in subsets.items():
        assert len(index["train"]) == n and len(set(index["train"])) == n
        assert not set(index["train"]) & set(index["control"])
    assert subsets[5]["control"] == subsets[10]["control"]  # one control set for every size that leaves room
    used = (
        set(subsets[30]["train"]) | set(subsets[30]["control"]) | {s["path"] for s in subsets[30]["skipped"]}
    )
    assert "part0/broken.png" not in set(subsets[30]["train"]) | set(subsets[30]["control"])
    assert len(used) <= 41


def test_corrupt_files_are_skipped_and_listed(folder):
    index = select_subsets(folder, 40, control_size=0, seed=0)  # needs every good file, so meets the bad one
    assert [s["path"] for s in index["skipped"]] == ["part0/broken.png"]
    assert "part0/broken.png" not in index["train"]


def test_a_subset_larger_than_the_folder_names_both_numbers(folder):
    with pytest.raises(ValueError, match="subset_size=50.*holds 41 images"):
        select_subsets(folder, 50)
    with pytest.raises(ValueError, match="1 are unreadable"):
        select_subsets(folder, 41)


def test_no_subset_size_trains_on_every_usable_file_outside_the_control_set(folder):
    index = select_subsets(folder, None, control_size=8, seed=3)
    assert len(index["control"]) == 8 and len(index["train"]) == 40 - 8
    assert index["control"] == select_subsets(folder, 10, control_size=8, seed=3)["control"]
    assert set(index["train"]) > set(select_subsets(folder, 10, control_size=8, seed=3)["train"])
    assert [s["path"] for s in index["skipped"]] == ["part0/broken.png"]
    listed = [f"part1/{i}.png" for i in range(1, 40, 2)]
    chosen = select_subsets(folder, 5, control_size=3, seed=3, files=listed)
    assert set(chosen["train"] + chosen["control"]) <= set(listed) and chosen["num_files"] == 20


def test_control_set_shrinks_with_a_warning_when_the_subset_takes_the_rest(folder, caplog):
    index = select_subsets(folder, 36, control_size=8)
    assert len(index["control"]) == 4
    assert "control set: 4 held-out images" in caplog.text


def test_embedded_faces_build_once_deterministically(tmp_path):
    images = build_embedded_faces(tmp_path, image_size=16)
    files = sorted(images.glob("*.png"))
    assert len(files) == 100 and Image.open(files[0]).size == (16, 16) and Image.open(files[0]).mode == "RGB"
    first = files[0].read_bytes()
    assert build_embedded_faces(tmp_path, image_size=16) == images and files[0].read_bytes() == first


def test_datamodule_batches_are_in_minus_one_one_and_every_image_is_drawn(folder, tmp_path):
    dm = ImageFolderDataModule(
        str(folder),
        subset_size=6,
        control_size=4,
        image_size=8,
        batch_size=3,
        num_workers=0,
        samples_per_epoch=12,
        index_file=str(tmp_path / "index.json"),
        pin_memory=False,
    )
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and batches[0]["image"].shape == (3, 3, 8, 8)
    images = np.concatenate([b["image"].numpy() for b in batches])
    assert images.min() >= -1 and images.max() <= 1
    assert sorted(i for b in batches for i in b["index"].tolist()) == sorted(list(range(6)) * 2)
    assert (tmp_path / "index.json").is_file()


def test_load_state_dict_refuses_another_selection(folder):
    a = ImageFolderDataModule(str(folder), subset_size=6, subset_seed=0)
    b = ImageFolderDataModule(str(folder), subset_size=7, subset_seed=0)
    b.load_state_dict(b.state_dict())  # same selection: fine
    with pytest.raises(ValueError, match="subset_size=6, subset_seed=0.*asks subset_size=7"):
        b.load_state_dict(a.state_dict())
