"""The Stable Diffusion replication recipe (experiments/sd_replication/run.py) end to end at tiny size: captions
from webdataset shards, generation from a tiny Stable Diffusion directory, a feature store, the search, the
table."""

import io
import json

import numpy as np
import pytest
from PIL import Image


def write_shards(folder, shards=2, per_shard=6):
    import webdataset as wds

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for t in range(shards):
        with wds.TarWriter(str(folder / f"{t:05d}.tar")) as sink:
            for i in range(per_shard):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                sink.write(
                    {"__key__": f"{t}{i:04d}", "jpg": buffer.getvalue(), "txt": f"photo {t} {i} of a thing"}
                )
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.mark.slow
def test_the_sd_replication_recipe_runs_end_to_end_at_tiny_size(tiny_sd_dir, tmp_path):
    from tests.conftest import ROOT, TINY_SD, load_script

    study = load_script(ROOT / "experiments" / "sd_replication" / "run.py", "sd_replication_run")
    args = [
        f"--shards={write_shards(tmp_path / 'laion')}",
        f"--pretrained={tiny_sd_dir}",
        f"--out={tmp_path / 'out'}",
        "--generations=3",
        f"--image-size={TINY_SD['image_size']}",
        "--steps=2",
        "--batch-size=3",
        "--background-anchors=5",
        "--device=cpu",
        "--extractor",
        "extractor=pixels",
        "extractor.size=8",
        "num_workers=0",
    ]
    summary = study.main(args)
    assert summary["generations"] == 3 and summary["training_rows"] == 12
    assert summary["share_low"] <= summary["share_above"] <= summary["share_high"]
    prompts = (tmp_path / "out" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 3 and all(p.startswith("photo ") for p in prompts)  # training captions
    manifest = json.loads((tmp_path / "out" / "store" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "webdataset" and len(manifest["shards"]) == 2
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["background_rows"] == 5 and report["train_cache"] == "store"
    assert "1.88 %" in (tmp_path / "out" / "results.md").read_text()
    # a second call finds every step done and only writes the table again
    assert study.main(args) == summary
