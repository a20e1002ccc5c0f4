"""Text-conditional diffusion: frozen text encoders, the module at a tiny size, CFG, GN/GNI noise, prompts in
src.generation with the inference-time mitigations."""

import json

import pytest
import torch

from src.generation import generate_to_folder, mitigated_prompts
from src.models.text2img import Text2ImageModule, check_stable_diffusion_dir
from src.nn.text_encoders import build_text_encoder
from tests.conftest import tiny_unet

TINY_COND_UNET = tiny_unet(conditional=True)
TINY_TEXT = {"source": "open_clip", "context_length": 16, "width": 32, "layers": 1, "heads": 2}


def tiny_text2img(**kwargs) -> Text2ImageModule:
    torch.manual_seed(0)
    return Text2ImageModule(TINY_COND_UNET, TINY_TEXT, image_size=16, **kwargs)


def test_tiny_text_encoder_is_frozen_and_gives_token_states():
    encoder = build_text_encoder(**TINY_TEXT)
    ids = encoder.tokenize(["a face", "another, longer caption of a face"])
    states = encoder(ids)
    assert ids.shape == (2, 16) and states.shape == (2, 16, 32) and encoder.dim == 32
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not torch.allclose(states[0], states[1])


def test_bad_text_encoder_and_stable_diffusion_dirs_are_named(tmp_path):
    with pytest.raises(ValueError, match="source='clip'.*open_clip, stable_diffusion"):
        build_text_encoder("clip")
    with pytest.raises(FileNotFoundError, match="no text_encoder/ folder"):
        build_text_encoder("stable_diffusion", path=str(tmp_path))
    (tmp_path / "unet").mkdir(), (tmp_path / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match="missing vae/, text_encoder/, tokenizer/"):
        check_stable_diffusion_dir(tmp_path)


def test_training_lowers_the_loss_on_a_fixed_batch_and_gn_reads_its_lambda():
    module = tiny_text2img(prompt_dropout=0.0)
    assert module.embedding_noise == 0.0
    assert tiny_text2img(train_mitigation={"name": "gn", "lam": 0.3}).embedding_noise == 0.3
    assert tiny_text2img(train_mitigation={"name": "rc", "p": 0.1}).embedding_noise == 0.0
    images, captions = torch.rand(4, 3, 16, 16) * 2 - 1, ["a dark face", "a bright face", "a face", "a man"]
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        torch.manual_seed(1)
        loss = module.loss({"image": images, "caption": captions})["loss"]
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not any(p.grad is not None for p in module.text_encoder.parameters())


def test_generation_depends_on_seed_prompt_guidance_and_embedding_noise():
    module = tiny_text2img().eval()
    args = {"steps": 2}
    batch = module.generate([3, 4], prompts=["a face", "a dark face"], **args)
    alone = module.generate([4], prompts=["a dark face"], **args)
    assert batch.shape == (2, 16, 16, 3) and torch.equal(batch[1], alone[0])
    # a random UNet barely reads the text: compare the float outputs through the uint8 images of several settings
    other_prompt = module.generate([4], prompts=["a bright face"], guidance_scale=50.0, **args)
    same_prompt = module.generate([4], prompts=["a dark face"], guidance_scale=50.0, **args)
    assert not torch.equal(other_prompt, same_prompt)
    noisy = module.generate([4], prompts=["a dark face"], embedding_noise=5.0, guidance_scale=50.0, **args)
    again = module.generate([4], prompts=["a dark face"], embedding_noise=5.0, guidance_scale=50.0, **args)
    assert torch.equal(noisy, again)
    assert not torch.equal(noisy, same_prompt)
    with pytest.raises(ValueError, match="one prompt per seed"):
        module.generate([1, 2], prompts=["a face"])


def test_sampling_writes_the_exact_prompts_after_the_inference_mitigation(tmp_path):
    module = tiny_text2img()
    prompts = ["portrait of kofe, a dark face", "portrait of lumi, a bright face", "a face"]
    rna = {"name": "rna", "repeats": 2}
    folder = generate_to_folder(
        module,
        tmp_path / "rna",
        3,
        seed=5,
        steps=2,
        prompts=prompts,
        inference_mitigation=rna,
        progress=False,
    )
    used = json.loads((folder / "prompts.json").read_text())
    assert list(used) == ["000000.png", "000001.png", "000002.png"]
    assert list(used.values()) == mitigated_prompts(prompts, 5, rna)
    for original, prompt in zip(prompts, used.values(), strict=True):
        assert len(prompt.split()) == len(original.split()) + 2
    again = mitigated_prompts(prompts, 5, rna)
    assert again == list(used.values())  # a resumed run feeds the same prompts
    with pytest.raises(ValueError, match="other settings"):
        generate_to_folder(module, folder, 3, seed=5, steps=2, prompts=prompts, progress=False)
    with pytest.raises(ValueError, match="inference_mitigation.name='blur'.*gni, rt, cwr, rna"):
        mitigated_prompts(prompts, 0, {"name": "blur"})


def test_an_inference_mitigation_needs_prompts(tmp_path):
    from tests.test_diffusion import tiny_module

    with pytest.raises(ValueError, match="needs prompts"):
        generate_to_folder(
            tiny_module(), tmp_path, 1, steps=2, inference_mitigation={"name": "rt"}, progress=False
        )


def test_prompt_embedding_target_per_generation_divides_the_joint_norm_by_the_square_root_of_the_rows():
    module = tiny_text2img().eval()
    prompts, seeds = ["a face", "a face", "a face", "a face", "another face"], [0, 1, 2, 3, 4]
    reports = {}
    for per_generation in (False, True):
        report = []
        options = {"name": "prompt_embedding", "max_steps": 0, "per_generation": per_generation}
        module.generate(seeds, prompts=prompts, steps=2, mitigation=options, report=report)
        reports[per_generation] = {entry["prompt"]: entry["initial_loss"] for entry in report}
    joint, per_generation = reports[False], reports[True]
    assert per_generation["a face"] == pytest.approx(joint["a face"] / 2, rel=1e-5)  # four rows: sqrt(4)
    assert per_generation["another face"] == pytest.approx(joint["another face"], rel=1e-5)  # one row
