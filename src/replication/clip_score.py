"""CLIP score of images against their prompts, as the DCR evaluation computes it
(docs/replication.md#dcr-measurement).

DCR `utils_ret.gen_clipscore`: OpenAI CLIP ViT-B/16, `encode_image` of the retrieval-preprocessed images
(Resize256 -> CenterCrop224 -> Normalize(0.5, 0.5), not CLIP's own normalisation) and `encode_text` of the prompts
(tokenised to 77 tokens, truncated), both L2-normalised; the score is the MEAN COSINE over the pairs, not x100 and
not clipped at 0 (torchmetrics' `CLIPScore` is 100 * max(cos, 0)). DCR computes it for the generations against their
prompts and for the training images against their caption 0.

Here the model is an open_clip CLIP (`load_clip("ViT-B-16", "openai")` is the DCR model; OpenAI weights run in
float32 here, in float16 on GPU in DCR).
"""

import torch

from src.data.images import image_batches
from src.metrics.clip_score import clip_score_from_features
from src.nn.extractors import dcr_transform


def load_clip(model_name: str = "ViT-B-16", pretrained: str | None = "openai"):
    """An open_clip CLIP (image and text towers, eval mode) and its tokenizer.

    pretrained: an open_clip tag ("openai"), a local checkpoint file of the whole model, or None (random weights,
    tests). OpenAI tags switch on QuickGELU (`src.nn.backbones.create_open_clip`).
    """
    import open_clip

    from src.nn.backbones import create_open_clip

    model = create_open_clip(model_name, pretrained).eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(model_name)


def _input_size(model) -> int:
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise ValueError(f"the CLIP score needs a square image input, the model takes {size}")
    return int(size[0])


@torch.no_grad()
def embed_images_and_prompts(
    model,
    tokenizer,
    folder,
    paths: list[str],
    prompts: list[str],
    batch_size: int = 64,
    num_workers: int = 0,
    device="cpu",
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """CLIP embeddings of the images `folder / paths[i]` and of `prompts[i]`.

    Images get the DCR transform at the model's input size (Resize256 -> CenterCrop224 -> Normalize(0.5, 0.5) at
    224 px). Unreadable images are skipped with their prompts.

    Returns:
        image features (M, D) and text features (M, D), float32 on the CPU and not normalised, and the indices
        (into `paths`) of the M readable images.
    """
    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts: give one prompt per image")
    transform = dcr_transform(_input_size(model))
    images, texts, kept = [], [], []
    for batch, index in image_batches(folder, paths, transform, batch_size, num_workers, "CLIP score"):
        index = index.tolist()
        tokens = tokenizer([prompts[i] for i in index]).to(device)
        images.append(model.encode_image(batch.to(device)).float().cpu())
        texts.append(model.encode_text(tokens).float().cpu())
        kept.extend(index)
    if not kept:
        raise RuntimeError(f"none of the {len(paths)} images under '{folder}' is readable for the CLIP score")
    return torch.cat(images), torch.cat(texts), kept


def clip_score_of_files(
    model, tokenizer, folder, paths: list[str], prompts: list[str], **embed_kwargs
) -> float:
    """DCR CLIP score (mean image-prompt cosine) of the images `folder / paths[i]` against `prompts[i]`; see
    `embed_images_and_prompts` for the preprocessing and `embed_kwargs`."""
    images, texts, _ = embed_images_and_prompts(model, tokenizer, folder, paths, prompts, **embed_kwargs)
    return clip_score_from_features(images, texts)
