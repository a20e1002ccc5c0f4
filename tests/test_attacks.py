"""Attacks (src/attacks, `python -m src.attack`): a planted generator whose memorised prompts are known gives
precision 1 and finds exactly the planted images; every attack config composes and runs on a tiny trained
model; bad input is refused with the key; an interrupted attack resumes without regenerating."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.attack import attack
from src.attacks.extraction import check_extraction_options, load_generations, run_adaptive, run_extraction
from tests.conftest import ROOT, compose_config, load_script

SIZE = 16


class PlantedGenerator(torch.nn.Module):
    """A text-conditional 'model' whose memorised prompts return the planted training image plus small noise
    (a different draw per seed), and whose other prompts return fresh random images."""

    def __init__(self, train: dict[str, np.ndarray], memorised: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something for the state digest
        self.train, self.memorised = train, memorised
        self.hparams = types.SimpleNamespace(image_size=SIZE, sampler="ddim", sample_steps=2)
        self.calls = 0

    def encode_prompts(self, prompts):  # marks the module as text-conditional
        raise NotImplementedError

    def generate(self, seeds, sampler=None, steps=None, use_ema=True, prompts=None):
        self.calls += len(seeds)
        images = []
        for seed, prompt in zip(seeds, prompts, strict=True):
            rng = np.random.default_rng(seed)
            if prompt in self.memorised:
                noise = rng.normal(0, 4, (SIZE, SIZE, 3))
                image = np.clip(self.train[self.memorised[prompt]].astype(float) + noise, 0, 255)
            else:
                image = rng.integers(0, 256, (SIZE, SIZE, 3))
            images.append(image.astype(np.uint8))
        return torch.from_numpy(np.stack(images))


class FakeRun:
    """The datamodule side of a run: a root of training images, their transform and their prompts."""

    def __init__(self, root: Path, prompts: dict[str, str]):
        self.root, self._prompts = root, prompts
        self.train_files = sorted(prompts)

    def image_transform(self):
        import torchvision.transforms as T

        return T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])

    def image_prompts(self):
        return dict(self._prompts)


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    root.mkdir()
    train, prompts = {}, {}
    for i in range(8):
        name = f"img{i}.png"
        train[name] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        Image.fromarray(train[name]).save(root / name)
        prompts[name] = f"a photo number {i}"
    memorised = {prompts["img1.png"]: "img1.png", prompts["img5.png"]: "img5.png"}
    return PlantedGenerator(train, memorised), FakeRun(root, prompts)


OPTIONS = {
    "edge_threshold": [0.1, 0.3],
    "min_clique_size": 4,
    "grid": [4, 4],
    "delta": 0.15,
    "alpha": 0.5,
    "neighbours": 3,
    "num_prompts": 8,
    "per_prompt": 6,
    "num_images": 20,
    "seed": 0,
    "sampler": None,
    "steps": None,
    "batch_size": 4,
    "use_ema": True,
    "resize": False,
}


def test_a_planted_generator_gives_precision_1_and_exactly_the_planted_images(planted, tmp_path):
    module, run = planted
    prompts = [(p, path) for path, p in run.image_prompts().items()]
    summary = run_extraction(module, run, tmp_path / "out", OPTIONS, prompts, progress=False)
    at = summary["thresholds"]["0.1"]
    assert (at["flagged"], at["verified"], at["precision"], at["recall"]) == (2, 2, 1.0, 1.0)
    assert at["unique_extracted"] == 2 and summary["groups_with_a_copy"] == 2
    rows = json.loads(json.dumps(summary))  # serialisable
    assert rows["num_groups"] == 8
    import csv

    with open(tmp_path / "out" / "extracted.csv") as f:
        extracted = [r for r in csv.DictReader(f) if r["flagged"] == "True" and r["edge_threshold"] == "0.1"]
    assert sorted(r["nearest_train"] for r in extracted) == ["img1.png", "img5.png"]
    assert all(r["verified"] == "True" and int(r["clique_size"]) == 6 for r in extracted)
    assert (tmp_path / "out" / "gallery.png").is_file() and (tmp_path / "out" / "scores.png").is_file()


def test_an_interrupted_attack_resumes_without_regenerating(planted, tmp_path):
    module, run = planted
    prompts = [(p, path) for path, p in run.image_prompts().items()][:3]
    run_extraction(
        module, run, tmp_path / "a", OPTIONS, prompts, generations=tmp_path / "gen", progress=False
    )
    first = module.calls
    (tmp_path / "gen" / "00001" / "000002.png").unlink()  # as if killed mid-prompt
    run_extraction(
        module, run, tmp_path / "b", OPTIONS, prompts, generations=tmp_path / "gen", progress=False
    )
    assert first == 18 and module.calls == first + 1


def test_the_adaptive_attack_flags_the_copies_of_an_unconditional_generator(planted, tmp_path):
    module, run = planted

    def generate(seeds, sampler=None, steps=None, use_ema=True):  # seeds below 3 copy img3.png
        rng = [np.random.default_rng(s) for s in seeds]
        copy = module.train["img3.png"].astype(float)
        return torch.from_numpy(
            np.stack(
                [
                    np.clip(copy + r.normal(0, 2, copy.shape), 0, 255)
                    if s < 3
                    else r.integers(0, 256, copy.shape)
                    for s, r in zip(seeds, rng, strict=True)
                ]
            ).astype(np.uint8)
        )

    module.generate = generate
    options = {**OPTIONS, "num_images": 10, "threshold": 1.0}
    summary = run_adaptive(module, run, tmp_path / "out", options, progress=False)
    assert summary["flagged"] == 3 and summary["unique_extracted"] == 1 and summary["precision"] == 1.0


def test_duplicated_prompts_rank_the_images_with_the_most_near_duplicates_first(planted, tmp_path):
    from src.attacks.extraction import candidate_prompts, duplicated_prompts
    from src.nn.extractors import PixelExtractor

    _, run = planted
    copy = np.asarray(Image.open(run.root / "img6.png"))
    for name in ("img2.png", "img4.png"):  # img2, img4 and img6 are one image three times
        Image.fromarray(copy).save(run.root / name)

    def mine(dm, by_image, count):
        return duplicated_prompts(dm, by_image, count, 0.99, PixelExtractor(8), "cpu")

    prompts = candidate_prompts("duplicated", run, 3, duplicates=mine)
    assert [path for _, path in prompts] == ["img2.png", "img4.png", "img6.png"]
    assert candidate_prompts("training", run, 2) == [
        ("a photo number 0", "img0.png"),
        ("a photo number 1", "img1.png"),
    ]


def test_bad_extraction_options_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="attack.edge_threshold is required.*did not publish"):
        check_extraction_options({**OPTIONS, "edge_threshold": None}, conditional=True)
    with pytest.raises(ValueError, match="attack.per_prompt=5 is below attack.min_clique_size=10"):
        check_extraction_options({**OPTIONS, "per_prompt": 5, "min_clique_size": 10}, conditional=True)
    folder = tmp_path / "gen"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "000000.png")
    with pytest.raises(ValueError, match="is 32x32 but the training images are 16x16.*attack.resize=true"):
        load_generations(folder, 16)
    images, _ = load_generations(folder, 16, resize=True)
    assert images.shape == (1, 3, 16, 16)


# ---- the entry point on tiny trained runs ----------------------------------------------------------------------

TINY_ATTACK = ["device=cpu", "attack.steps=2", "attack.batch_size=8"]


@pytest.mark.slow
def test_extraction_and_adaptive_run_on_a_tiny_ddpm(tiny_run, tmp_path):
    run = tiny_run("ddpm_quickstart").run_dir
    common = [f"ckpt_path={run}", *TINY_ATTACK, "attack.num_images=8", "attack.neighbours=4"]
    summary = attack(
        compose_config(
            "attack.yaml",
            ["attack=extraction", *common, "attack.edge_threshold=[0.2,0.5]", "attack.min_clique_size=2"],
            tmp_path / "extraction",
        )
    )
    assert set(summary["thresholds"]) == {"0.2", "0.5"} and summary["num_train"] == 8
    assert (tmp_path / "extraction" / "extracted.csv").is_file()
    assert (run / "samples" / "attack_ddim2_seed0" / "all" / "manifest.json").is_file()
    metrics = json.loads((tmp_path / "extraction" / "metrics.json").read_text())
    assert "thresholds/0.2/flagged" in metrics
    adaptive = attack(compose_config("attack.yaml", ["attack=adaptive", *common], tmp_path / "adaptive"))
    assert adaptive["num_generated"] == 8


@pytest.mark.slow
def test_extraction_runs_on_a_tiny_text_to_image_run(tiny_run, tmp_path):
    run = tiny_run("t2i_quickstart").run_dir
    overrides = ["attack=extraction", f"ckpt_path={run}", *TINY_ATTACK, "attack.edge_threshold=0.3"]
    overrides += [
        "attack.num_prompts=2",
        "attack.per_prompt=3",
        "attack.min_clique_size=2",
        "attack.neighbours=3",
    ]
    summary = attack(compose_config("attack.yaml", overrides, tmp_path / "t2i"))
    assert summary["num_groups"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["loss", "secmi", "pia", "pian"])
def test_membership_attacks_run_on_a_tiny_ddpm(tiny_run, tmp_path, name):
    run = tiny_run("ddpm_quickstart").run_dir
    overrides = [f"attack={name}", f"ckpt_path={run}", "device=cpu", "attack.bootstrap=20"]
    if name == "loss":
        overrides += ["attack.timesteps=[50,200]", "attack.draws=2"]
    summary = attack(compose_config("attack.yaml", overrides, tmp_path))
    assert summary["num_members"] == 8 and summary["num_nonmembers"] == 8
    keys = ["loss@t=50", "loss@t=200"] if name == "loss" else [name]
    for key in keys:
        assert 0 <= summary[key]["auc"] <= 1 and len(summary[key]["auc_ci"]) == 2
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "scores.csv").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert f"{keys[0]}/auc" in metrics


def test_membership_without_held_out_images_says_which_option_adds_them(tmp_path, ddpm_run_dir):
    index = {"root": str(tmp_path), "seed": 0, "subset_size": 1, "control_size": 0, "num_files": 1}
    (ddpm_run_dir / "subset_index.json").write_text(json.dumps({**index, "train": ["a.png"], "control": []}))
    cfg = compose_config(
        "attack.yaml", ["attack=loss", f"ckpt_path={ddpm_run_dir}", "device=cpu"], tmp_path / "a"
    )
    with pytest.raises(ValueError, match="data.control_size"):
        attack(cfg)


@pytest.mark.slow
def test_a_training_run_ends_with_its_attacks(attacked_run, tmp_path):
    run, metrics = attacked_run.run_dir, attacked_run.metrics
    assert "attack/loss/loss@t=10/auc" in metrics and "attack/adaptive/num_generated" in metrics
    assert "attack/extraction/thresholds/0.3/flagged" in metrics
    assert (run / "attacks" / "loss" / "roc.png").is_file()
    # extraction and adaptive generated into one shared, content-keyed folder
    assert sorted(p.name for p in (run / "samples").glob("attack_*")) == ["attack_ddim2_seed0"]
    assert (run / "samples" / "attack_ddim2_seed0" / "all" / "000005.png").is_file()
    aggregate = load_script(ROOT / "experiments" / "extraction" / "aggregate.py", "extraction_aggregate")
    (row,) = aggregate.aggregate([run], tmp_path / "study")
    assert row["subset_size"] == 8 and row["params"] > 0 and 0 <= row["loss@t=10_auc"] <= 1
    assert row["adaptive_unique"] <= 8 and row["adaptive_unique_ci"].startswith("[")
    assert (tmp_path / "study" / "study.png").is_file() and (tmp_path / "study" / "study.csv").is_file()


def test_extraction_without_a_threshold_names_the_key(tmp_path, ddpm_run_dir):
    cfg = compose_config(
        "attack.yaml", ["attack=extraction", f"ckpt_path={ddpm_run_dir}", "device=cpu"], tmp_path
    )
    with pytest.raises(ValueError, match="attack.edge_threshold is required"):
        attack(cfg)


@pytest.fixture
def ddpm_run_dir(tmp_path, data_dir):
    """A run folder as training leaves it, without training: the config and an untrained checkpoint."""
    import lightning as L
    from omegaconf import OmegaConf

    from src.models.ddpm import DDPMModule
    from tests.conftest import tiny_diffusion_overrides, tiny_unet

    run = tmp_path / "run"
    cfg = compose_config(
        "train.yaml", ["experiment=ddpm_quickstart", *tiny_diffusion_overrides(data_dir)], run
    )
    (run / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module = DDPMModule(tiny_unet(), image_size=32)
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def test_the_aggregate_tables_every_training_arm_and_inference_mitigation(tmp_path):
    aggregate = load_script(ROOT / "experiments" / "extraction" / "aggregate.py", "extraction_aggregate")
    run = tmp_path / "0"
    (run / "attacks" / "extraction").mkdir(parents=True)
    (run / "attacks" / "extraction_rna").mkdir()
    (run / "attacks" / "loss").mkdir()
    (run / "config_resolved.yaml").write_text("mitigation: {name: mc}\ndata: {subset_size: 20}\n")
    for folder, flagged in (("extraction", 3), ("extraction_rna", 1)):
        report = {
            "num_groups": 20,
            "groups_with_a_copy": 5,
            "thresholds": {"0.1": {"flagged": flagged, "precision": 1.0, "unique_extracted": flagged}},
        }
        (run / "attacks" / folder / "report.json").write_text(json.dumps(report))
    summary = {"loss@t=50": {"auc": 0.7}, "loss@t=100": {"auc": 0.9}}
    (run / "attacks" / "loss" / "membership.json").write_text(json.dumps({"summary": summary}))
    rows = aggregate.mitigation_rows([run])
    assert [(r["train_mitigation"], r["inference_mitigation"]) for r in rows] == [
        ("mc", "none"),
        ("mc", "rna"),
    ]
    assert rows[0]["extracted@0.1"] == 3 and rows[1]["extracted@0.1"] == 1
    assert rows[0]["loss_auc"] == 0.9 and rows[0]["loss_best_t"] == "100" and "loss_auc" not in rows[1]
    aggregate.draw_mitigations(rows, ["0.1"])
