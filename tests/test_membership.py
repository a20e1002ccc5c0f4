"""Membership inference: the ROC statistics (exact on hand-worked scores, ties, bootstrap intervals), the
loss, SecMI and PIA scores on tiny modules, a planted memorizing denoiser they must detect, and the run's
members and non-members."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.attacks.membership import loss_scores, membership_sets, pia_scores, run_membership, secmi_scores
from src.data.diffusion.image_folder import diffusion_transform
from src.data.images import load_rgb
from src.metrics.membership import roc_curve, roc_summary
from src.models.ddpm import DDPMModule
from src.models.text2img import Text2ImageModule
from tests.conftest import tiny_unet

TINY_TEXT = {"source": "open_clip", "context_length": 16, "width": 32, "layers": 1, "heads": 2}


def tiny_ddpm() -> DDPMModule:
    torch.manual_seed(0)
    return DDPMModule(tiny_unet(), image_size=16)


def tiny_text2img() -> Text2ImageModule:
    torch.manual_seed(0)
    return Text2ImageModule(tiny_unet(conditional=True), TINY_TEXT, image_size=16)


def random_images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- ROC statistics ----------------------------------------------------------------------------------------
def test_separable_scores_give_auc_and_tpr_one():
    summary = roc_summary([10.0, 11.0, 12.0, 13.0], [0.0, 1.0, 2.0], bootstrap=50)
    assert summary["auc"] == 1.0 and summary["tpr@1%fpr"] == 1.0 and summary["tpr@0.1%fpr"] == 1.0
    assert summary["auc_ci"] == [1.0, 1.0] and summary["tpr@1%fpr_ci"] == [1.0, 1.0]
    assert summary["num_members"] == 4 and summary["num_nonmembers"] == 3
    assert summary["fpr_resolution"] == pytest.approx(1 / 3) and not summary["tpr@0.1%fpr_meaningful"]


def test_identical_distributions_give_chance():
    rng = np.random.default_rng(0)
    summary = roc_summary(rng.normal(size=20000), rng.normal(size=20000), bootstrap=0)
    assert summary["auc"] == pytest.approx(0.5, abs=0.01)
    assert summary["tpr@1%fpr"] == pytest.approx(0.01, abs=0.004)
    assert summary["tpr@0.1%fpr_meaningful"]
    assert "auc_ci" not in summary and "tpr@1%fpr_ci" not in summary


def test_hand_worked_example_with_a_tie():
    # pairs (m, n): (3,2) (3,0) (2,0) (1,0) won, (2,2) tied, (1,2) lost: AUC = 4.5 / 6
    members, nonmembers = [3.0, 2.0, 1.0], [2.0, 0.0]
    fpr, tpr = roc_curve(members, nonmembers)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    summary = roc_summary(members, nonmembers, bootstrap=0)
    assert summary["auc"] == 0.75 == pytest.approx(np.trapezoid(tpr, fpr))
    assert summary["tpr@1%fpr"] == pytest.approx(1 / 3)
    assert roc_summary([1.0, 1.0], [1.0, 1.0], bootstrap=0)["auc"] == 0.5
    assert roc_summary([1.0, 1.0], [1.0, 1.0], bootstrap=0)["tpr@1%fpr"] == 0.0


def test_tpr_at_low_fpr_is_the_best_point_within_the_target():
    # 1,000 non-members 0..999: threshold 999 has FPR 0.1% exactly, threshold 990 has FPR 1% exactly
    members = [1000.0, 999.0, 995.0, 985.0]
    summary = roc_summary(members, np.arange(1000.0), bootstrap=0)
    assert summary["tpr@0.1%fpr"] == 0.5 and summary["tpr@1%fpr"] == 0.75
    assert summary["tpr@0.1%fpr_meaningful"] and summary["fpr_resolution"] == 0.001


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.5, 1, 300), rng.normal(0, 1, 300)
    summary = roc_summary(members, nonmembers, bootstrap=200, seed=3)
    for key in ("auc", "tpr@1%fpr"):
        low, high = summary[f"{key}_ci"]
        assert low <= summary[key] <= high and low < high
    assert roc_summary(members, nonmembers, bootstrap=200, seed=3) == summary
    with pytest.raises(ValueError, match="NaN"):
        roc_summary([1.0, float("nan")], [0.0])


# ---- the attacks -------------------------------------------------------------------------------------------
def test_attacks_on_a_tiny_ddpm_are_finite_deterministic_and_batch_free():
    module, images = tiny_ddpm(), random_images(3, seed=0)
    loss = loss_scores(module, images, timesteps=[10, 500], draws=2, batch_size=2)
    assert set(loss) == {10, 500} and all(s.shape == (3,) and torch.isfinite(s).all() for s in loss.values())
    whole = loss_scores(module, images, timesteps=[10, 500], draws=2, batch_size=3)
    for t in loss:
        torch.testing.assert_close(loss[t], whole[t], rtol=1e-4, atol=1e-6)
    assert not torch.equal(loss[10], loss_scores(module, images, timesteps=[10], draws=2, seed=1)[10])
    secmi = secmi_scores(module, images, t_sec=20, k=10, batch_size=2)
    torch.testing.assert_close(secmi, secmi_scores(module, images, t_sec=20, k=10, batch_size=3))
    pia = pia_scores(module, images, t=50, batch_size=3)
    assert torch.equal(pia, pia_scores(module, images, t=50, batch_size=3))
    pian = pia_scores(module, images, t=50, normal=True)
    for scores in (secmi, pia, pian):
        assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores <= 0).all()
    assert not torch.allclose(pia, pian)
    with pytest.raises(ValueError, match="multiple of k"):
        secmi_scores(module, images, t_sec=25, k=10)
    with pytest.raises(ValueError, match="timesteps=1000"):
        loss_scores(module, images, timesteps=[1000])
    with pytest.raises(ValueError, match="unconditional"):
        pia_scores(module, images, prompts=["a face"] * 3)


def test_attacks_on_a_tiny_text_conditional_module_read_the_prompts():
    module, images = tiny_text2img(), random_images(3, seed=0)
    prompts = ["a dark face", "a bright face", "a face"]
    loss = loss_scores(module, images, timesteps=[100], prompts=prompts, batch_size=2)[100]
    secmi = secmi_scores(module, images, t_sec=20, k=10, prompts=prompts)
    pia = pia_scores(module, images, t=50, prompts=prompts)
    guided = pia_scores(module, images, t=50, prompts=prompts, guidance_scale=3.0)
    for scores in (loss, secmi, pia, guided):
        assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert not torch.equal(pia, pia_scores(module, images, t=50, prompts=["a man"] * 3))
    assert not torch.equal(pia, guided)
    with pytest.raises(ValueError, match="one prompt per image"):
        loss_scores(module, images, timesteps=[100])


class MemorizingUNet(torch.nn.Module):
    """A denoiser that has memorized `members`: it takes x_t for the noised member nearest to it and returns
    the noise that member would need, so it is exact on members and wrong elsewhere."""

    def __init__(self, members: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.members, self.alphas_cumprod = members, alphas_cumprod

    def forward(self, x, t):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1, 1).float()
        candidates = a.sqrt() * self.members[None]  # (B, M, C, H, W)
        nearest = (x[:, None] - candidates).flatten(2).norm(dim=2).argmin(dim=1)
        chosen = candidates[torch.arange(len(x)), nearest]
        return SimpleNamespace(sample=(x - chosen) / (1 - a[:, 0]).sqrt())


def test_every_attack_finds_the_members_of_a_memorizing_denoiser(tmp_path):
    members, nonmembers = random_images(4, seed=1), random_images(4, seed=2)
    module = tiny_ddpm()
    module.ema = None
    module.unet = MemorizingUNet(members, module.noise_scheduler.alphas_cumprod)
    attacks = ["loss", "secmi", "pia", "pian"]
    options = {"loss": {"timesteps": [50, 100]}, "secmi": {"t_sec": 30, "k": 10}, "pia": {"t": 100}}
    paths = [f"m{i}.png" for i in range(4)], [f"n{i}.png" for i in range(4)]
    summary = run_membership(
        module, members, nonmembers, attacks, options, tmp_path, *paths, batch_size=3, bootstrap=20
    )
    assert set(summary) == {"loss@t=50", "loss@t=100", "secmi", "pia", "pian"}
    for name, result in summary.items():
        assert result["auc"] == 1.0 and result["tpr@1%fpr"] == 1.0, name
    record = json.loads((tmp_path / "membership.json").read_text())
    assert record["options"]["secmi"] == {"t_sec": 30, "k": 10}
    assert record["options"]["pian"] == {"t": 200, "p": 4} and record["summary"]["pia"]["auc"] == 1.0
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["path"] for r in rows] == paths[0] + paths[1] and [r["member"] for r in rows] == ["1"] * 4 + [
        "0"
    ] * 4
    assert (tmp_path / "roc.png").stat().st_size > 0
    with pytest.raises(ValueError, match="unknown membership attack"):
        run_membership(module, members, nonmembers, ["lira"])


# ---- members and non-members of a run ----------------------------------------------------------------------
def write_images(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / name)


def write_run(run, data: dict, index: dict | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"data": data}), run / "config_resolved.yaml")
    if index is not None:
        (run / "subset_index.json").write_text(json.dumps(index))


IMAGE_FOLDER = "src.data.diffusion.image_folder.ImageFolderDataModule"


def test_membership_sets_read_the_subset_index(tmp_path):
    root = tmp_path / "images"
    write_images(root, ["a.png", "b.png", "c.png", "d.png"])
    index = {"root": str(root), "train": ["a.png", "b.png"], "control": ["d.png"], "skipped": []}
    write_run(tmp_path / "run", {"_target_": IMAGE_FOLDER, "root": str(root), "image_size": 8}, index)
    members, nonmembers, member_paths, nonmember_paths, *prompts = membership_sets(tmp_path / "run")
    assert members.shape == (2, 3, 8, 8) and nonmembers.shape == (1, 3, 8, 8)
    assert member_paths == ["a.png", "b.png"] and nonmember_paths == ["d.png"] and prompts == [None, None]
    expected = diffusion_transform(8, random_flip=False)(load_rgb(root / "d.png"))
    assert torch.equal(nonmembers[0], expected) and members.min() >= -1 and members.max() <= 1
    assert membership_sets(tmp_path / "run", image_size=4)[0].shape == (2, 3, 4, 4)


def test_membership_sets_name_a_missing_index_and_an_empty_control_set(tmp_path):
    data = {"_target_": IMAGE_FOLDER, "root": str(tmp_path / "images"), "image_size": 8}
    write_run(tmp_path / "no_index", data)
    with pytest.raises(FileNotFoundError, match=r"no subset_index.json.*data.control_size=<n>"):
        membership_sets(tmp_path / "no_index")
    index = {"root": str(tmp_path / "images"), "train": ["a.png"], "control": [], "skipped": []}
    write_run(tmp_path / "no_control", data, index)
    with pytest.raises(ValueError, match=r"no control image.*data.control_size=<n>"):
        membership_sets(tmp_path / "no_control")
    with pytest.raises(FileNotFoundError, match="config_resolved.yaml"):
        membership_sets(tmp_path / "elsewhere")


def test_membership_sets_of_a_captioned_run_prompt_with_caption_zero(tmp_path):
    root = tmp_path / "images"
    names = ["a.png", "b.png", "c.png", "d.png"]
    write_images(root, names)
    captions = {name: [f"caption of {name}", "another"] for name in names}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    data = {
        "_target_": "src.data.diffusion.captioned.CaptionedDataModule",
        "root": str(root),
        "captions": str(tmp_path / "captions.json"),
        "subset_size": 2,
        "control_size": 2,
        "image_size": 8,
        "num_workers": 0,
        "pin_memory": False,
    }
    write_run(tmp_path / "run", data)
    members, nonmembers, member_paths, nonmember_paths, member_prompts, nonmember_prompts = membership_sets(
        tmp_path / "run"
    )
    assert members.shape == nonmembers.shape == (2, 3, 8, 8)
    assert sorted(member_paths + nonmember_paths) == names
    assert member_prompts == [f"caption of {p}" for p in member_paths]
    assert nonmember_prompts == [f"caption of {p}" for p in nonmember_paths]
