"""White-box membership inference on a trained diffusion module
(docs/attacks.md#newer-membership-inference-attacks, docs/attacks.md#cifar-10-and-membership-inference):
members are the run's training subset, non-members its held-out control images, so the ground truth is exact.

Three scores, each higher for "member", written once for both kinds of module through `NoisePredictor` (the
model-space input and ε_θ(x_t, t) of a `DDPMModule` or a `Text2ImageModule`, EMA weights by default):

- `loss_scores`: minus the denoising error at fixed timesteps (the loss-threshold attack);
- `secmi_scores`: minus SecMI's t-error (Duan et al., ICML 2023);
- `pia_scores`: minus PIA's error (Kong et al., ICLR 2024), and its normal-noise variant PIAN.

`membership_sets` reads the run's members and non-members, `run_membership` runs the attacks and writes
membership.json, scores.csv and roc.png.
"""

import csv
import json
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from tqdm import tqdm

from src.data.diffusion.captioned import caption_transform, class_name_of
from src.data.diffusion.captions import load_captions
from src.data.diffusion.image_folder import diffusion_transform
from src.data.images import folder_files, load_rgb
from src.generation import run_datamodule
from src.metrics.membership import roc_curve, roc_summary
from src.models.diffusion import sampling_network
from src.plots import save_figure
from src.utils.checks import check_number
from src.utils.files import read_json

log = logging.getLogger(__name__)

ATTACKS = ("loss", "secmi", "pia", "pian")
DEFAULT_OPTIONS = {
    "loss": {"timesteps": [100], "draws": 1, "seed": 0},
    "secmi": {"t_sec": 100, "k": 10},
    "pia": {"t": 200, "p": 4},
    "pian": {"t": 200, "p": 4},
}


# ---- the noise predictor of either module ------------------------------------------------------------------
class NoisePredictor:
    """ε_θ(x_t, t) of a diffusion module, in its model space, whatever it was trained to predict.

    `model_space(images)`: pixels in [-1, 1] to what the UNet denoises (the pixels themselves, or the VAE
    latents of a Stable Diffusion module: the mean of the latent distribution times the scaling factor, so
    scores are deterministic; training draws a sample). `condition(prompts)`: the text states of a
    text-conditional module (None for an unconditional one), computed once per batch. `eps(x_t, t,
    condition)`: the predicted noise, the UNet's output turned into ε for v- and x0-prediction (ε-space errors
    differ from the training target's by a factor fixed per t, so rankings at one t are the same).
    `guidance_scale` 1 uses the conditional prediction alone; another value mixes in the empty prompt's as
    classifier-free guidance. Puts the network in eval mode.
    """

    def __init__(self, module: L.LightningModule, use_ema: bool = True, guidance_scale: float = 1.0):
        self.module = module
        self.network = sampling_network(module, use_ema).eval()
        self.alphas_cumprod = module.noise_scheduler.alphas_cumprod.double()
        self.prediction_type = module.noise_scheduler.config.prediction_type
        self.conditional = hasattr(module, "encode_prompts")
        self.guidance_scale = guidance_scale

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t])

    @torch.no_grad()
    def model_space(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.module.device, torch.float32)
        vae = getattr(self.module, "vae", None)
        if vae is None:
            return images
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def condition(self, prompts: list[str] | None) -> torch.Tensor | None:
        return self.module.encode_prompts(prompts) if self.conditional else None

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int, condition: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if condition is None:
            output = self.network(x, timesteps).sample
        elif self.guidance_scale == 1.0:
            output = self.network(x, timesteps, encoder_hidden_states=condition).sample
        else:
            empty = self.module.empty_prompt().expand_as(condition)
            both = self.network(
                torch.cat([x, x]),
                torch.cat([timesteps, timesteps]),
                encoder_hidden_states=torch.cat([empty, condition]),
            ).sample
            unconditional, conditional = both.chunk(2)
            output = unconditional + self.guidance_scale * (conditional - unconditional)
        return eps_from_output(output.float(), x, self.alpha_bar(t), self.prediction_type)


def eps_from_output(
    output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """ε from a UNet output of the given prediction type at x_t (v = √ᾱ ε − √(1−ᾱ) x0; sample = x0)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(alpha_bar) * output + math.sqrt(1 - alpha_bar) * x
    if prediction_type == "sample":
        return (x - math.sqrt(alpha_bar) * output) / math.sqrt(1 - alpha_bar)
    raise ValueError(
        f"prediction_type={prediction_type!r} is not known; valid: epsilon, v_prediction, sample"
    )


def noised(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """One deterministic DDIM step from ᾱ_from to ᾱ_to (either direction): x0 predicted from (x, ε), then
    re-noised with the same ε."""
    x0 = (x - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return noised(x0, eps, alpha_to)


def check_prompts(predictor: NoisePredictor, prompts: list[str] | None, count: int) -> None:
    if predictor.conditional and (prompts is None or len(prompts) != count):
        raise ValueError(
            f"a text-conditional module needs one prompt per image: {count} images, "
            f"{None if prompts is None else len(prompts)} prompts"
        )
    if not predictor.conditional and prompts is not None:
        raise ValueError("prompts were given, but the module is unconditional")


def check_timestep(key: str, t: int, predictor: NoisePredictor, low: int = 0) -> int:
    return check_number(key, t, low=low, high=predictor.num_timesteps - 1, integer=True)


def scores_by_batch(predictor, images, prompts, batch_size: int, desc: str, score_batch) -> torch.Tensor:
    """`score_batch(x0, condition, first_index)` over batches of `images` (model space, on the module's
    device), concatenated on the CPU, under a progress bar."""
    check_prompts(predictor, prompts, len(images))
    check_number("batch_size", batch_size, low=1, integer=True)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x0 = predictor.model_space(images[start : start + batch_size])
        condition = predictor.condition(None if prompts is None else prompts[start : start + batch_size])
        out.append(score_batch(x0, condition, start).float().cpu())
    return torch.cat(out)


# ---- the attacks -------------------------------------------------------------------------------------------
def seeded_noise(shape: tuple[int, ...], seed: int, draw: int, index: int) -> torch.Tensor:
    """Gaussian noise for image `index`, draw `draw`: the same whatever batch the image falls in."""
    state = int(np.random.SeedSequence([seed, draw, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


@torch.no_grad()
def loss_scores(
    module: L.LightningModule,
    images: torch.Tensor,
    timesteps: list[int],
    draws: int = 1,
    seed: int = 0,
    prompts: list[str] | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    guidance_scale: float = 1.0,
) -> dict[int, torch.Tensor]:
    """{t: (N,) scores}: minus the denoising error mean((ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, t))²) over the
    model-space elements, averaged over `draws` noise draws (the loss-threshold attack,
    docs/attacks.md#cifar-10-and-membership-inference).

    images: (N, C, H, W) in [-1, 1]; prompts: one per image for a text-conditional module. The noise of image
    i in draw d is seeded by (seed, d, i) and shared by every timestep, so scores do not depend on the batch
    size.
    """
    predictor = NoisePredictor(module, use_ema, guidance_scale)
    timesteps = [check_timestep("timesteps", t, predictor) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty: give at least one timestep, e.g. [100]")
    check_number("draws", draws, low=1, integer=True)

    def score_batch(x0, condition, start):
        errors = torch.zeros(len(x0), len(timesteps), device=x0.device)
        for draw in range(draws):
            noise = torch.stack([seeded_noise(x0.shape[1:], seed, draw, start + i) for i in range(len(x0))])
            noise = noise.to(x0.device, x0.dtype)
            for j, t in enumerate(timesteps):
                x_t = noised(x0, noise, predictor.alpha_bar(t))
                errors[:, j] += (predictor.eps(x_t, t, condition) - noise).pow(2).flatten(1).mean(1)
        return -errors / draws

    scores = scores_by_batch(predictor, images, prompts, batch_size, "loss attack", score_batch)
    return {t: scores[:, j] for j, t in enumerate(timesteps)}


@torch.no_grad()
def secmi_scores(
    module: L.LightningModule,
    images: torch.Tensor,
    t_sec: int = 100,
    k: int = 10,
    prompts: list[str] | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """(N,) scores: minus SecMI's t-error (Duan et al., ICML 2023; SecMI_stat, the threshold attack).

    x0 is inverted by deterministic DDIM steps of k (ε_θ at the current step; the clean image is taken as the
    state at step 0, ᾱ_0 = 1 − β_1) up to x̃_{t_sec−k}, one more inversion step gives x̃_{t_sec}, one
    deterministic DDIM denoising step brings it back to t_sec − k, and the error is the squared l2 norm (sum
    over elements) of its difference with x̃_{t_sec−k}. Lower error means member; the score is its negative.

    Read in the official code (jinhaoduan/SecMI `mia_evals/secmia.py`: `get_intermediate_results`,
    `ddim_singlestep`, `naive_statistic_attack`; the same procedure is `SecMIAttacker` in kong13661/PIA
    `DDPM/components.py`): t_sec = 100 and k = 10 are its defaults (argparse and `secmi_attack`), the error is
    the 'l2' statistic ((a − b)²).sum over elements, EMA weights (`WA=True`), x0 scaled to [-1, 1]. Ours also
    allows t_sec = k (the official loop then has no inversion step and fails). SecMI_NNs (a ResNet trained on
    the error maps) is not implemented. For latent models the official SecMI-LDM code was not read.
    """
    predictor = NoisePredictor(module, use_ema, guidance_scale)
    check_number("k", k, low=1, integer=True)
    check_timestep("t_sec", t_sec, predictor, low=k)
    if t_sec % k:
        raise ValueError(f"t_sec={t_sec} must be a multiple of k={k}")
    a = predictor.alpha_bar

    def score_batch(x0, condition, start):
        x = x0
        for t in range(0, t_sec - k, k):
            x = ddim_step(x, predictor.eps(x, t, condition), a(t), a(t + k))
        x_sec = ddim_step(x, predictor.eps(x, t_sec - k, condition), a(t_sec - k), a(t_sec))
        back = ddim_step(x_sec, predictor.eps(x_sec, t_sec, condition), a(t_sec), a(t_sec - k))
        return -(back - x).pow(2).flatten(1).sum(1)

    return scores_by_batch(predictor, images, prompts, batch_size, "secmi attack", score_batch)


@torch.no_grad()
def pia_scores(
    module: L.LightningModule,
    images: torch.Tensor,
    t: int = 200,
    p: float = 4,
    prompts: list[str] | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    guidance_scale: float = 1.0,
    normal: bool = False,
) -> torch.Tensor:
    """(N,) scores: minus PIA's error (Kong et al., ICLR 2024).

    ε_0 = ε_θ(x0, 0), the model's own prediction at t = 0, is used as the noise: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε_0
    (the DDIM-style deterministic point, no random noise), and the error is Σ |ε_0 − ε_θ(x_t, t)|^p over
    elements (the p-th power of the l_p norm: the same ranking). `normal=True` is PIAN: ε_0 rescaled per image
    so that its mean absolute value is √(2/π), that of a standard normal.

    Read in the official code (kong13661/PIA `DDPM/components.py` classes `PIA`, `PIAN`, `DDIMAttacker`;
    `DDPM/attack.py`, `stable_diffusion/stable_attack.py`): p = 4 (`lp=4`), ᾱ indexed as cumprod(1 − β)[t],
    EMA weights, x0 in [-1, 1]. The official scripts sweep t = 10, 20, ..., 300 (DDPM: attack_num=30,
    interval=10) and print the AUC of each; no single t is fixed in the code, so t = 200 here is our choice,
    not confirmed there. Their Stable Diffusion attack also mixes classifier-free guidance 7.5 into every ε
    (`guidance_scale` here, default 1: conditional only) and samples the VAE latent (we take its mean).
    """
    predictor = NoisePredictor(module, use_ema, guidance_scale)
    check_timestep("t", t, predictor, low=1)
    check_number("p", p, low=0)
    if p == 0:
        raise ValueError("p=0: must be > 0")

    def score_batch(x0, condition, start):
        eps0 = predictor.eps(x0, 0, condition)
        if normal:
            dims = list(range(1, eps0.ndim))
            eps0 = eps0 / eps0.abs().mean(dims, keepdim=True) * math.sqrt(2 / math.pi)
        x_t = noised(x0, eps0, predictor.alpha_bar(t))
        return -(eps0 - predictor.eps(x_t, t, condition)).abs().pow(p).flatten(1).sum(1)

    return scores_by_batch(predictor, images, prompts, batch_size, "pia attack", score_batch)


# ---- members and non-members of a run ----------------------------------------------------------------------
def no_control_set(run_dir: Path, what: str) -> ValueError:
    return ValueError(
        f"run '{run_dir}' {what}: membership inference needs held-out non-members. Train with a control set, "
        "data.control_size=<n> (e.g. data.control_size=1000; TPR at 0.1% FPR needs at least 1,000), so that "
        "the run keeps images out of training"
    )


def is_captioned(data_config) -> bool:
    return str(data_config.get("_target_", "")).endswith("CaptionedDataModule")


def membership_prompts(datamodule, paths: list[str]) -> list[str]:
    """The prompt each image is attacked with: the prompt of the run's conditioning level, caption 0 of the
    image for instancelevel_blip (what the model saw for a member with nodup and no caption mitigation)."""
    level = datamodule.hparams.conditioning
    if level == "nolevel":
        return ["An image"] * len(paths)
    if level == "classlevel":
        return [f"An image of {class_name_of(path)}" for path in paths]
    if level == "instancelevel_random":
        raise ValueError(
            "conditioning instancelevel_random: members were trained on fixed random captions that "
            "non-members do not have, so no prompt treats both alike; membership inference supports the "
            "other levels"
        )
    captions = load_captions(
        datamodule.captions_file,
        folder_files(datamodule.root),
        allow_missing=datamodule.hparams.allow_missing_captions,
    )
    return [captions[path][0] for path in paths]


def load_images(root: Path, paths: list[str], transform, desc: str) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1]: each file read with `load_rgb` (as training reads it) and transformed."""
    images = [transform(load_rgb(root / path)) for path in tqdm(paths, desc=desc, unit="image", leave=False)]
    return torch.stack(images)


def membership_sets(run_dir, image_size: int | None = None) -> tuple:
    """(members, nonmembers, member_paths, nonmember_paths, member_prompts, nonmember_prompts) of a run.

    members: (N, 3, H, W) in [-1, 1], the training subset; nonmembers: the control images; both transformed as
    training did without its random flip (resize and centre crop at `image_size`, default the run's
    data.image_size). Paths relative to the image root. Prompts: None for an unconditional run; for a
    captioned run caption 0 of each image (or the level's prompt, `membership_prompts`).

    The selection is the run's subset_index.json (written by src/data/diffusion/image_folder.py); a captioned
    run without one gets it rebuilt from its config_resolved.yaml (the same seeded selection).
    FileNotFoundError for a missing file, ValueError for an empty control set, both naming the fix
    (data.control_size=<n>).
    """
    run_dir = Path(run_dir)
    config_file = run_dir / "config_resolved.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"run '{run_dir}' has no config_resolved.yaml: give the folder of a `python -m src.train` run"
        )
    data = OmegaConf.load(config_file).data
    size = image_size or int(data.image_size)
    index_file = run_dir / "subset_index.json"
    datamodule = None
    if is_captioned(
        data
    ):  # its captions give the prompts; the selection is rebuilt when no index was written
        datamodule = run_datamodule(
            run_dir, "membership inference", "give the folder of a `python -m src.train` run"
        )
    if index_file.is_file():
        index = read_json(index_file, "subset index")
        root, train, control = Path(index["root"]), index.get("train", []), index.get("control", [])
    elif datamodule is not None:
        root, train, control = datamodule.root, datamodule.train_files, datamodule.control_files
    else:
        raise FileNotFoundError(
            f"run '{run_dir}' has no subset_index.json, the list of its training images (members) and "
            "control images (non-members) that src/data/diffusion/image_folder.py writes as training starts; "
            "membership inference needs it. Train with data.control_size=<n> (e.g. 1000) to get a control set"
        )
    if not control:
        raise no_control_set(run_dir, "has no control image (its 'control' list is empty)")
    if not train:
        raise ValueError(f"run '{run_dir}' lists no training image (its 'train' list is empty)")
    if datamodule is None:
        transform = diffusion_transform(size, random_flip=False)
        member_prompts = nonmember_prompts = None
    else:
        transform = caption_transform(size, center_crop=True, random_flip=False)
        member_prompts = membership_prompts(datamodule, train)
        nonmember_prompts = membership_prompts(datamodule, control)
    members = load_images(root, train, transform, "members")
    nonmembers = load_images(root, control, transform, "non-members")
    return members, nonmembers, list(train), list(control), member_prompts, nonmember_prompts


# ---- running the attacks and writing the results -----------------------------------------------------------
def attack_scores(
    module, images, attack: str, options: dict, prompts, batch_size: int, use_ema: bool
) -> dict:
    """{score name: (N,) scores} of one attack: `loss@t=<t>` per timestep, else the attack's name."""
    common = {"prompts": prompts, "batch_size": batch_size, "use_ema": use_ema}
    if attack == "loss":
        return {f"loss@t={t}": s for t, s in loss_scores(module, images, **options, **common).items()}
    if attack == "secmi":
        return {"secmi": secmi_scores(module, images, **options, **common)}
    return {attack: pia_scores(module, images, **options, **common, normal=attack == "pian")}


def attack_options(attacks: list[str], options: dict | None) -> dict:
    """{attack: keyword arguments}: `DEFAULT_OPTIONS` updated with `options`; ValueError for unknown names."""
    options = options or {}
    unknown = [name for name in [*attacks, *options] if name not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown membership attack(s) {unknown}; valid: {', '.join(ATTACKS)}")
    if not attacks:
        raise ValueError(f"no attack asked; valid: {', '.join(ATTACKS)}")
    return {name: {**DEFAULT_OPTIONS[name], **options.get(name, {})} for name in attacks}


def draw_roc(curves: dict[str, tuple], summary: dict, num_nonmembers: int) -> Figure:
    """ROC curves on a log FPR axis (the low-FPR region, where attacks are judged) with the chance diagonal;
    FPR 0 is drawn at half the FPR resolution."""
    floor = 0.5 / num_nonmembers
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    grid = np.logspace(np.log10(floor), 0, 200)
    ax.plot(grid, grid, "k--", linewidth=0.8, label="chance")
    for name, (fpr, tpr) in curves.items():
        label = f"{name} (AUC {summary[name]['auc']:.3f}, TPR@1% {summary[name]['tpr@1%fpr']:.3f})"
        ax.step(np.maximum(fpr, floor), tpr, where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def write_scores_csv(
    path: Path, paths: list[str], is_member: list[bool], scores: dict[str, torch.Tensor]
) -> None:
    """One row per image: path, member (1/0), then one column per score name."""
    names = list(scores)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "member", *names])
        for i, (image_path, member) in enumerate(zip(paths, is_member, strict=True)):
            writer.writerow([image_path, int(member), *(repr(float(scores[n][i])) for n in names)])


def run_membership(
    module: L.LightningModule,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    attacks: list[str],
    options: dict | None = None,
    out_dir=None,
    member_paths: list[str] | None = None,
    nonmember_paths: list[str] | None = None,
    member_prompts: list[str] | None = None,
    nonmember_prompts: list[str] | None = None,
    batch_size: int = 64,
    use_ema: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Run each attack of `attacks` (loss, secmi, pia, pian) on members and non-members; return {score name:
    `roc_summary`} (`loss@t=<t>` per timestep of the loss attack).

    options: {attack: keyword arguments of its function} over `DEFAULT_OPTIONS`. With `out_dir`, writes
    membership.json (the summaries, the options used and the counts), scores.csv (path, member, one column per
    score) and roc.png (one curve per score, log FPR axis). bootstrap / seed: the intervals of `roc_summary`.
    """
    resolved = attack_options(attacks, options)
    member_scores, nonmember_scores = {}, {}
    for attack, kwargs in resolved.items():
        log.info("membership attack %s %s", attack, kwargs)
        member_scores.update(
            attack_scores(module, members, attack, kwargs, member_prompts, batch_size, use_ema)
        )
        nonmember_scores.update(
            attack_scores(module, nonmembers, attack, kwargs, nonmember_prompts, batch_size, use_ema)
        )
    summary = {
        name: roc_summary(member_scores[name], nonmember_scores[name], bootstrap=bootstrap, seed=seed)
        for name in member_scores
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "summary": summary,
            "options": resolved,
            "num_members": len(members),
            "num_nonmembers": len(nonmembers),
            "use_ema": use_ema,
            "bootstrap": bootstrap,
        }
        (out_dir / "membership.json").write_text(json.dumps(record, indent=2))
        paths = (member_paths or [f"member_{i}" for i in range(len(members))]) + (
            nonmember_paths or [f"nonmember_{i}" for i in range(len(nonmembers))]
        )
        is_member = [True] * len(members) + [False] * len(nonmembers)
        scores = {name: torch.cat([member_scores[name], nonmember_scores[name]]) for name in member_scores}
        write_scores_csv(out_dir / "scores.csv", paths, is_member, scores)
        curves = {name: roc_curve(member_scores[name], nonmember_scores[name]) for name in member_scores}
        save_figure(draw_roc(curves, summary, len(nonmembers)), out_dir / "roc.png")
    return summary
