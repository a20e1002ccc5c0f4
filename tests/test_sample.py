"""`python -m src.sample` and src.generation: generations into a folder with a manifest, resumable, refusing mixed
settings."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.generation import generate_to_folder
from src.sample import sample
from tests.conftest import compose_config
from tests.test_diffusion import tiny_module


def test_resume_generates_only_the_missing_images_and_they_match(tmp_path):
    module = tiny_module()
    folder = generate_to_folder(module, tmp_path / "a", 5, seed=10, steps=2, batch_size=2, progress=False)
    (folder / "000003.png").unlink()  # as if the run had stopped before image 3
    before = (folder / "000001.png").stat().st_mtime_ns
    generate_to_folder(module, folder, 6, seed=10, steps=2, batch_size=2, progress=False)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert (folder / "000001.png").stat().st_mtime_ns == before  # kept, not regenerated
    fresh = generate_to_folder(module, tmp_path / "b", 6, seed=10, steps=2, batch_size=4, progress=False)
    for i in range(6):
        assert Image.open(folder / f"{i:06d}.png").tobytes() == Image.open(fresh / f"{i:06d}.png").tobytes()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (
        manifest | {"num_images": 6} == manifest and manifest["seed"] == 10 and manifest["sampler"] == "ddim"
    )


def test_the_generation_time_is_recorded_and_summed_over_resumed_calls(tmp_path):
    module = tiny_module()
    folder = generate_to_folder(module, tmp_path, 3, seed=0, steps=2, batch_size=2, progress=False)
    first = json.loads((folder / "timing.json").read_text())
    assert first["images"] == 3 and first["seconds"] > 0
    assert first["seconds_per_image"] == pytest.approx(first["seconds"] / 3)
    generate_to_folder(module, folder, 3, seed=0, steps=2, batch_size=2, progress=False)  # nothing to do
    assert json.loads((folder / "timing.json").read_text()) == first
    generate_to_folder(module, folder, 5, seed=0, steps=2, batch_size=2, progress=False)  # two more
    both = json.loads((folder / "timing.json").read_text())
    assert both["images"] == 5 and both["seconds"] > first["seconds"]


def test_a_folder_of_other_settings_is_refused(tmp_path):
    module = tiny_module()
    generate_to_folder(module, tmp_path, 2, seed=0, steps=2, progress=False)
    with pytest.raises(ValueError, match="other settings.*'steps': \\(2, 3\\)"):
        generate_to_folder(module, tmp_path, 2, seed=0, steps=3, progress=False)


def test_sample_entry_point_loads_a_checkpoint(tmp_path):
    import lightning as L

    module = tiny_module()
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    trainer.save_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    overrides = [f"ckpt_path={tmp_path / 'run'}", "num_images=3", "steps=2", "sampler=ddpm", "device=cpu"]
    cfg = compose_config("sample.yaml", overrides, tmp_path / "out")
    folder = sample(cfg)
    assert folder == tmp_path / "run" / "samples" / "last_ddpm2_seed0"
    assert len(list(folder.glob("*.png"))) == 3
    expected = module.generate([1], sampler="ddpm", steps=2)[0]
    assert torch.equal(expected, torch.from_numpy(np.asarray(Image.open(folder / "000001.png"))))


def test_parts_fill_one_folder_with_the_images_of_a_single_process(tmp_path):
    module = tiny_module()
    whole = generate_to_folder(module, tmp_path / "whole", 5, seed=3, steps=2, batch_size=2, progress=False)
    for part in (1, 0, 2):  # any order, as array tasks finish
        generate_to_folder(
            module, tmp_path / "parts", 5, seed=3, steps=2, batch_size=4, progress=False, part=part, parts=3
        )
        done = sorted(p.name for p in (tmp_path / "parts").glob("*.png"))
        assert len(done) == {1: 2, 0: 3, 2: 5}[part]  # ranges [0, 1), [1, 3), [3, 5)
    for i in range(5):
        name = f"{i:06d}.png"
        assert Image.open(whole / name).tobytes() == Image.open(tmp_path / "parts" / name).tobytes()
    timings = sorted(p.name for p in (tmp_path / "parts").glob("timing*.json"))
    assert timings == ["timing_part0of3.json", "timing_part1of3.json", "timing_part2of3.json"]
    with pytest.raises(ValueError, match="part must be in"):
        generate_to_folder(module, tmp_path / "bad", 5, steps=2, part=3, parts=3)
