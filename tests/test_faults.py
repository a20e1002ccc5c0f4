"""The fault suite: every bad input or fault a demanding user met gives a correct result or a clear error that
names the key or the file and the fix; nothing is silently stale, mixed, overwritten or dropped.

Sections: caches and sample folders keyed by content; run folders never reused; numeric ranges; the one
checkpoint loader; faults that must keep holding (malicious pickles, kill and resume, interrupted sampling).
The data-file errors (JSON, captions, embeddings, subset decoding) follow at the end.
"""

import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from src.data.diffusion.captions import load_captions
from src.data.diffusion.image_folder import select_subsets
from src.data.images import UnreadableImage, folder_files, load_rgb, read_list
from src.generation import generate_to_folder, load_module
from src.nn.csd import load_csd
from src.nn.extractors import Extractor, PixelExtractor
from src.replicate import replicate
from src.replication.analysis import load_prompts, load_sampling_weights
from src.replication.features import cached_folder_features
from src.sample import sample
from src.train import train
from src.utils.checkpoints import CheckpointError, file_digest, load_checkpoint
from src.utils.embeddings import load_embeddings
from tests.conftest import ROOT, compose_config, tiny_diffusion_overrides, tiny_overrides
from tests.test_diffusion import tiny_module


def write_images(folder: Path, count: int, size: int = 16, seed: int = 0, prefix: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{prefix}{i:06d}.png")
    return folder


def save_module(module, path: Path) -> Path:
    """A Lightning checkpoint of `module`, as training writes it."""
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ddpm_ckpt(tmp_path_factory) -> Path:
    return save_module(tiny_module(), tmp_path_factory.mktemp("ddpm") / "checkpoints" / "last.ckpt")


class LinearExtractor(Extractor):
    """A tiny extractor with weights: 4x4 thumbnails through one linear layer."""

    name = "linear"
    dim = 8

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = torch.nn.Linear(48, 8)
        self._freeze()

    def transform(self):
        return PixelExtractor(4).transform()

    def embed(self, images):
        return self.proj(images.flatten(1))


# ---- caches and sample folders keyed by content ----------------------------------------------------------------


def test_feature_cache_is_keyed_by_the_extractor_weights(tmp_path):
    train_dir = write_images(tmp_path / "train", 4)
    first = cached_folder_features(LinearExtractor(0), train_dir, tmp_path / "cache")
    again = cached_folder_features(LinearExtractor(0), train_dir, tmp_path / "cache")
    other = cached_folder_features(LinearExtractor(1), train_dir, tmp_path / "cache")
    assert (first.cache, again.cache, other.cache) == ("miss", "hit", "miss")
    assert torch.equal(first.features, again.features) and not torch.allclose(first.features, other.features)


def test_a_corrupt_feature_cache_file_is_re_extracted(tmp_path, caplog):
    train_dir = write_images(tmp_path / "train", 3)
    cached_folder_features(LinearExtractor(0), train_dir, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*/shards/00000.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # truncated by a full disk
    with caplog.at_level(logging.WARNING):
        result = cached_folder_features(LinearExtractor(0), train_dir, tmp_path / "cache")
    assert result.cache == "miss" and "truncated" in caplog.text


@pytest.mark.slow
def test_replicate_with_an_overwritten_extractor_checkpoint_is_not_served_the_old_cache(tiny_run, tmp_path):
    """The case of a run's last.ckpt analysed during and after training: same path, new weights."""
    run = tiny_run("csd_quickstart").run_dir
    model = tmp_path / "model.ckpt"
    model.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    train_dir, generated = (
        write_images(tmp_path / "train", 6, 32),
        write_images(tmp_path / "gen", 4, 32, seed=1),
    )

    def run_replicate(name: str) -> dict:
        overrides = [
            f"generated={generated}",
            f"train={train_dir}",
            "extractor=csd",
            f"extractor.checkpoint={model}",
            f"cache_dir={tmp_path / 'cache'}",
            "complexity=false",
            "num_workers=0",
            "device=cpu",
        ]
        return replicate(compose_config("replicate.yaml", overrides, tmp_path / name))

    first = run_replicate("first")
    checkpoint = torch.load(model, weights_only=True)
    checkpoint["state_dict"] = {
        k: v * (1 + 0.2 * torch.rand_like(v)) if v.is_floating_point() else v
        for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, model)
    second = run_replicate("second")
    uncached = replicate(
        compose_config(
            "replicate.yaml",
            [
                f"generated={generated}",
                f"train={train_dir}",
                "extractor=csd",
                f"extractor.checkpoint={model}",
                "cache_dir=null",
                "complexity=false",
                "num_workers=0",
                "device=cpu",
            ],
            tmp_path / "uncached",
        )
    )
    assert second["sim_95pc"] == pytest.approx(uncached["sim_95pc"])
    assert second["sim_95pc"] != pytest.approx(first["sim_95pc"])


def test_file_digest_is_remembered_until_the_file_changes(tmp_path, digest_table):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = file_digest(path)
    assert json.loads(digest_table.read_text())[str(path.resolve())]["sha256"] == first
    table = json.loads(digest_table.read_text())
    table[str(path.resolve())]["sha256"] = (
        "remembered"  # proves the second call reads the table, not the file
    )
    digest_table.write_text(json.dumps(table))
    assert file_digest(path) == "remembered"
    path.write_bytes(b"b" * 1001)
    assert file_digest(path) not in ("remembered", first)


def sample_cfg(tmp_path: Path, name: str, ckpt: Path, *overrides: str):
    base = [f"ckpt_path={ckpt}", "steps=2", "sampler=ddim", "device=cpu", "batch_size=2"]
    return compose_config("sample.yaml", [*base, *overrides], tmp_path / name)


def test_a_sample_folder_never_mixes_two_models_behind_one_checkpoint_path(tmp_path, ddpm_ckpt):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(ddpm_ckpt.read_bytes())
    folder = tmp_path / "samples"
    sample(sample_cfg(tmp_path, "a", ckpt, "num_images=2", f"output_folder={folder}"))
    later = tiny_module()
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.1)
    save_module(later, ckpt)  # the file is overwritten by later weights
    with pytest.raises(ValueError, match="weights differ"):
        sample(sample_cfg(tmp_path, "b", ckpt, "num_images=4", f"output_folder={folder}"))
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png"]
    # the same weights under another path resume the folder: the key is the content, not the path
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(ddpm_ckpt.read_bytes())
    sample(sample_cfg(tmp_path, "c", moved, "num_images=3", f"output_folder={folder}"))
    assert len(list(folder.glob("*.png"))) == 3


def test_a_folder_of_images_without_a_manifest_is_refused_unless_adopted(tmp_path, ddpm_ckpt):
    foreign = write_images(tmp_path / "foreign", 2, size=64)
    with pytest.raises(ValueError, match=r"2 image\(s\) but no manifest.json \(000000.png, 000001.png\)"):
        sample(sample_cfg(tmp_path, "a", ddpm_ckpt, "num_images=3", f"output_folder={foreign}"))
    with pytest.raises(ValueError, match="not 16x16.*000000.png \\(64x64\\)"):
        sample(sample_cfg(tmp_path, "b", ddpm_ckpt, "num_images=3", f"output_folder={foreign}", "adopt=true"))
    assert not (foreign / "manifest.json").exists()
    own = write_images(tmp_path / "own", 2, size=16)
    sample(sample_cfg(tmp_path, "c", ddpm_ckpt, "num_images=3", f"output_folder={own}", "adopt=true"))
    manifest = json.loads((own / "manifest.json").read_text())
    assert manifest["adopted"] == ["000000.png", "000001.png"] and len(list(own.glob("*.png"))) == 3


# ---- run folders never reused ----------------------------------------------------------------------------------


def test_train_refuses_a_folder_that_holds_a_run_and_leaves_it_untouched(tiny_run):
    run = tiny_run("csd_quickstart").run_dir
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    cfg = compose_config("train.yaml", ["experiment=csd_quickstart", *tiny_overrides(run.parent)], run)
    with pytest.raises(FileExistsError, match=f"already holds a run.*ckpt_path={run}"):
        train(cfg)
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_command_line_refuses_an_existing_run_dir_before_hydra_writes_into_it(tmp_path):
    train_dir, generated = write_images(tmp_path / "train", 3), write_images(tmp_path / "gen", 2, seed=1)
    run_dir = tmp_path / "run"
    args = ["-m", "src.replicate", f"generated={generated}", f"train={train_dir}", "complexity=false"]
    args += ["num_workers=0", "device=cpu", "cache_dir=null", f"hydra.run.dir={run_dir}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    again = run_cli(*args, "threshold=0.9")
    assert again.returncode != 0 and "already holds a run" in again.stderr
    assert before == {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


# ---- numeric ranges, with the config key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("threshold=2", r"threshold=2: must be a number >= -1 and <= 1"),
        ("threshold=-1.5", r"threshold=-1.5: must be a number >= -1 and <= 1"),
        ("k=0", r"k=0: must be an integer >= 1"),
        ("batch_size=0", r"batch_size=0: must be an integer >= 1"),
        ("gallery_size=-1", r"gallery_size=-1: must be an integer >= 0"),
    ],
)
def test_replicate_refuses_out_of_range_numbers_by_key(tmp_path, override, message):
    cfg = compose_config(
        "replicate.yaml", [f"generated={tmp_path}", f"train={tmp_path}", override], tmp_path / "run"
    )
    with pytest.raises(ValueError, match=message):
        replicate(cfg)


def test_k_above_the_training_set_is_clipped_with_a_warning_naming_both(tmp_path, caplog):
    train_dir, generated = write_images(tmp_path / "train", 3), write_images(tmp_path / "gen", 2, seed=1)
    overrides = [f"generated={generated}", f"train={train_dir}", "k=10", "complexity=false", "num_workers=0"]
    with caplog.at_level(logging.WARNING):
        replicate(compose_config("replicate.yaml", [*overrides, "cache_dir=null"], tmp_path / "run"))
    assert "k=10 is more than the 3 training images; using k=3" in caplog.text


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_images=-5", r"num_images=-5: must be an integer >= 1"),
        ("num_images=0", r"num_images=0: must be an integer >= 1"),
        ("steps=0", r"steps=0: must be an integer >= 1"),
        ("batch_size=0", r"batch_size=0: must be an integer >= 1"),
    ],
)
def test_sample_refuses_out_of_range_numbers_by_key(tmp_path, ddpm_ckpt, override, message):
    with pytest.raises(ValueError, match=message):
        sample(sample_cfg(tmp_path, "run", ddpm_ckpt, override))


def test_train_refuses_a_non_numeric_trainer_option_by_key(tmp_path, data_dir):
    cfg = compose_config(
        "train.yaml",
        ["experiment=csd_quickstart", *tiny_overrides(data_dir), "trainer.max_steps=abc"],
        tmp_path,
    )
    with pytest.raises(ValueError, match="trainer.max_steps='abc': must be an integer >= -1"):
        train(cfg)
    assert not (tmp_path / "config_resolved.yaml").exists()


# ---- one loader for checkpoints and weight files ---------------------------------------------------------------


@pytest.fixture
def bad_files(tmp_path, ddpm_ckpt) -> dict[str, Path]:
    text = tmp_path / "notes.ckpt"
    text.write_text("these are my notes, not weights\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ddpm_ckpt.read_bytes()[:2000])
    return {"text": text, "empty": empty, "truncated": truncated}


@pytest.mark.parametrize(
    "kind, message",
    [
        ("text", r"is not a torch checkpoint: it starts with 'these are my notes.*\(text\)"),
        ("empty", r"is empty \(0 bytes\)"),
        ("truncated", r"is truncated or corrupt"),
    ],
)
def test_the_loader_names_the_path_and_what_the_file_is(bad_files, kind, message):
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(bad_files[kind], "checkpoint", make="train one")
    assert str(bad_files[kind]) in str(error.value) and "To get one, train one." in str(error.value)


def test_every_entry_point_gives_the_loader_s_message_for_a_text_file(tmp_path, bad_files, data_dir):
    text = bad_files["text"]
    with pytest.raises(
        CheckpointError, match=f"checkpoint '{text}' is not a torch checkpoint.*ddpm_quickstart"
    ):
        sample(sample_cfg(tmp_path, "sample", text, "num_images=1"))
    with pytest.raises(CheckpointError, match=f"ckpt_path '{text}' is not a torch checkpoint"):
        train(
            compose_config(
                "train.yaml",
                ["experiment=csd_quickstart", *tiny_overrides(data_dir), f"ckpt_path={text}"],
                tmp_path,
            )
        )
    with pytest.raises(
        CheckpointError, match=f"CSD checkpoint '{text}' is not a torch checkpoint.*csd_quickstart"
    ):
        load_csd(text)
    overrides = [
        f"generated={tmp_path}",
        f"train={tmp_path}",
        "extractor=sscd",
        f"extractor.checkpoint={text}",
    ]
    with pytest.raises(
        CheckpointError, match=f"SSCD weights '{text}' is not a torch checkpoint.*sscd_disc_mixup"
    ):
        replicate(compose_config("replicate.yaml", overrides, tmp_path / "replicate"))


@pytest.mark.slow
def test_a_checkpoint_of_the_wrong_module_says_which_was_found_and_expected(tiny_run, ddpm_ckpt):
    csd = tiny_run("csd_quickstart").run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(
        CheckpointError, match="is a checkpoint of CSDModule; expected a checkpoint of DDPMModule"
    ):
        load_module(str(csd), "cpu")
    with pytest.raises(
        CheckpointError, match="is a checkpoint of DDPMModule; expected a checkpoint of CSDModule"
    ):
        load_csd(ddpm_ckpt)


class Payload:
    """Unpickling this runs a command: what a malicious checkpoint does."""

    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


@pytest.fixture
def malicious(tmp_path) -> Path:
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, path)
    return path


def test_a_malicious_pickle_is_refused_everywhere_a_weight_file_is_read(
    tmp_path, malicious, data_dir, monkeypatch
):
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        load_module(str(malicious), "cpu")
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        load_csd(malicious)
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        train(
            compose_config(
                "train.yaml",
                ["experiment=csd_quickstart", *tiny_overrides(data_dir), f"ckpt_path={malicious}"],
                tmp_path / "train",
            )
        )
    overrides = [
        f"generated={tmp_path}",
        f"train={tmp_path}",
        "extractor=sscd",
        f"extractor.checkpoint={malicious}",
    ]
    with pytest.raises(CheckpointError, match="weights-only loading refuses"):
        replicate(compose_config("replicate.yaml", overrides, tmp_path / "replicate"))
    assert ran == [] and pickle.loads(pickle.dumps(1)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["csd_quickstart", "ddpm_quickstart", "t2i_quickstart"])
def test_every_kind_of_training_checkpoint_loads_weights_only(tiny_run, experiment):
    """What a run saves (its hyperparameters and the datamodule's included) holds tensors and plain containers
    only, so resuming, sampling and attacking it never meet the weights-only refusal."""
    checkpoint = load_checkpoint(tiny_run(experiment).run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2


# ---- faults that must keep holding -----------------------------------------------------------------------------


def test_interrupted_sampling_resumes_and_keeps_every_finished_image(tmp_path, monkeypatch):
    module = tiny_module()
    calls = []
    real_generate = module.generate

    def generate_then_die(seeds, **kwargs):
        calls.append(seeds)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C or pre-emption during the second batch
        return real_generate(seeds, **kwargs)

    monkeypatch.setattr(module, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_to_folder(module, tmp_path, 4, steps=2, batch_size=2, progress=False)
    finished = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    assert sorted(finished) == ["000000.png", "000001.png"] and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(module, "generate", real_generate)
    generate_to_folder(module, tmp_path, 4, steps=2, batch_size=2, progress=False)
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    assert len(list(tmp_path.glob("*.png"))) == 4


@pytest.mark.slow
def test_kill_9_during_training_then_resume_continues_from_the_last_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["-m", "src.train", "experiment=ddpm_quickstart", *tiny_diffusion_overrides(data_dir)]
    args += ["callbacks.replication=null", "trainer.max_steps=10000", "trainer.val_check_interval=null"]
    args += ["callbacks.model_checkpoint.every_n_train_steps=2"]
    args += [f"hydra.run.dir={run_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE)
    last, step, deadline = run_dir / "checkpoints" / "last.ckpt", 0, time.time() + 300
    while step < 4 and time.time() < deadline and process.poll() is None:
        time.sleep(0.5)
        try:
            step = torch.load(last, weights_only=True)["global_step"] if last.is_file() else 0
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):
            step = 0  # being written
    assert process.poll() is None, process.stderr.read().decode()[-3000:]  # still training when killed
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert step >= 4
    step = torch.load(last, weights_only=True)["global_step"]
    overrides = [
        "experiment=ddpm_quickstart",
        *tiny_diffusion_overrides(data_dir),
        "callbacks.replication=null",
        f"trainer.max_steps={step + 2}",
        f"ckpt_path={run_dir}",
    ]
    train(compose_config("train.yaml", overrides, tmp_path / "resumed"))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == step + 2


# ---- data files: the file and the line named, nothing dropped without a word ---------------------------------


def save_image(path, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A random 16x16 RGB image saved at `path`; returns its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_malformed_prompts_json_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text('{\n  "a.png": "a cat",\n  "b.png": oops\n}')
    with pytest.raises(ValueError, match=r"prompts file '.*prompts.json', line 3 column 12: not valid JSON"):
        load_prompts(path, ["a.png", "b.png"])


def test_non_utf8_captions_file_names_the_line_and_the_byte(tmp_path):
    path = tmp_path / "captions.json"
    path.write_bytes(b'{\n  "a.png": ["caf\xe9 au lait"]\n}')
    with pytest.raises(ValueError) as error:
        load_captions(path, ["a.png"])
    message = str(error.value)
    assert f"captions file '{path}', line 2: not UTF-8 text (byte 0xe9 at offset 18)" in message
    assert "save the file as UTF-8" in message


def test_malformed_captions_json_names_the_line_and_column(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"a.png": ["one"],\n "b.png": ["two",]}')
    with pytest.raises(
        ValueError, match=r"captions file '.*captions.json', line 2 column 18: not valid JSON"
    ):
        load_captions(path, ["a.png", "b.png"])


def test_missing_captions_message_names_the_config_key(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"a.png": ["one"]}))
    with pytest.raises(ValueError) as error:
        load_captions(path, ["a.png", "b.png"])
    message = str(error.value)
    assert str(path) in message and "1 of 2 images have no captions (b.png)" in message
    assert "data.allow_missing_captions=true" in message and "allow_missing=True" in message


def test_embeddings_that_are_a_text_file_name_the_file_and_the_command(tmp_path):
    path = tmp_path / "embeddings.npz"
    path.write_text("query,database\n1,2\n")
    with pytest.raises(ValueError) as error:
        load_embeddings(path)
    message = str(error.value)
    assert f"'{path}'" in message and "not a numpy .npz archive" in message
    assert "python -m src.evaluate save_embeddings=true" in message


def test_embeddings_that_are_a_pickle_or_an_npz_without_the_keys_are_named(tmp_path):
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps({"query": [1.0]}))
    with pytest.raises(ValueError, match="pickled.npz' is not an .npz written by save_embeddings"):
        load_embeddings(pickled)
    other = tmp_path / "other.npz"
    np.savez(other, query=np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"other.npz' .*missing keys \['database', "):
        load_embeddings(other)


def test_sampling_weights_npy_that_is_a_text_file_names_the_file(tmp_path):
    path = tmp_path / "weights.npy"
    path.write_text("1.0\n5.0\n")
    with pytest.raises(ValueError) as error:
        load_sampling_weights(path, ["a.png", "b.png"])
    message = str(error.value)
    assert f"sampling weights file '{path}' is not a numpy array file" in message
    assert "written by numpy.save" in message


def test_prompts_json_naming_a_missing_generation_is_an_error(tmp_path):
    folder = tmp_path / "generated"
    save_image(folder / "a.png")
    (folder / "b.png").write_bytes(b"unreadable")  # present but unreadable: skipped by the extraction
    path = tmp_path / "prompts.json"
    path.write_text(
        json.dumps({"a.png": "a cat", "b.png": "a dog", "gone.png": "a cow", "sub/x.png": "an owl"})
    )
    with pytest.raises(ValueError) as error:
        load_prompts(path, ["a.png"], folder)
    message = str(error.value)
    assert (
        f"prompts file '{path}' names 2 generation(s) that are not files of the generated folder" in message
    )
    assert "['gone.png', 'sub/x.png']" in message and str(folder) in message


def test_prompts_json_naming_an_unreadable_but_present_generation_is_accepted(tmp_path):
    folder = tmp_path / "generated"
    save_image(folder / "a.png")
    (folder / "b.png").write_bytes(b"unreadable")
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"a.png": "a cat", "b.png": "a dog"}))
    assert load_prompts(path, ["a.png"], folder) == ["a cat"]


def test_a_file_given_as_the_generated_folder_says_it_is_a_file(tmp_path):
    image = tmp_path / "one.png"
    save_image(image)
    for files in (None, ["one.png"]):
        with pytest.raises(NotADirectoryError) as error:
            folder_files(image, files)
        assert str(error.value) == f"'{image}' is a file, not a folder; give the folder that holds the images"


def test_read_list_on_non_utf8_text_names_the_line(tmp_path):
    path = tmp_path / "files.txt"
    path.write_bytes(b"a.png\nb.png\n\xffc.png\n")
    with pytest.raises(ValueError) as error:
        read_list(path)
    message = str(error.value)
    assert f"list file '{path}', line 3: not UTF-8 text (byte 0xff at offset 12)" in message
    assert "save the file as UTF-8" in message


def test_select_subsets_skips_an_image_that_verifies_but_does_not_decode(tmp_path):
    for i in range(6):
        save_image(tmp_path / f"{i}.png", seed=i)
    data = save_image(tmp_path / "bad.jpg", fmt="JPEG")
    (tmp_path / "bad.jpg").write_bytes(data[: data.index(b"\xff\xda") + 20])  # cut inside the scan data
    with Image.open(tmp_path / "bad.jpg") as image:
        image.verify()  # the header is intact: verify() passes
    with pytest.raises(UnreadableImage, match="truncated"):
        load_rgb(tmp_path / "bad.jpg")
    index = select_subsets(tmp_path, 6, control_size=0, seed=0)  # needs every good file, so meets the bad one
    assert [s["path"] for s in index["skipped"]] == ["bad.jpg"]
    assert "truncated" in index["skipped"][0]["reason"]
    assert "bad.jpg" not in index["train"] and len(index["train"]) == 6
