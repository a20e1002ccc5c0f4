"""Frozen text encoders for text-conditional diffusion: captions -> per-token hidden states (B, L, D).

Three sources, one interface (`tokenize(list[str]) -> (B, L) ids`, `forward(ids) -> (B, L, D)`, `.dim`,
`.end_token_id`):

- `open_clip` with `model_name=None`: a small randomly initialised CLIP text transformer on open_clip's CLIP BPE
  tokenizer (shipped with the package, so CPU runs and tests need no download); frozen, for the CPU quick trials.
- `open_clip` with a model name (`ViT-B-32`, `ViT-H-14`, ...) and a `pretrained` tag or local file: that model's text
  tower; the hidden states after the final LayerNorm, as Stable Diffusion uses them.
- `stable_diffusion`: the `text_encoder` / `tokenizer` folders of a diffusers Stable Diffusion directory
  (transformers' CLIPTextModel, `last_hidden_state`), as DCR's fine-tuning
  (docs/memorization.md#training-setup).
"""

from pathlib import Path

import torch
from torch import nn

SOURCES = ("open_clip", "stable_diffusion")


class OpenCLIPTextEncoder(nn.Module):
    """open_clip text transformer; `model_name=None` builds a random one of `width` / `layers` / `heads`."""

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        context_length: int = 77,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        import open_clip
        from open_clip.transformer import TextTransformer

        self.context_length = context_length
        self.tokenizer = open_clip.get_tokenizer(model_name or "ViT-B-32")
        if model_name is None:
            self.text = TextTransformer(
                context_length=context_length,
                width=width,
                heads=heads,
                layers=layers,
                output_dim=width,
                output_tokens=True,
            )
            self.dim = width
        else:
            model = open_clip.create_model(model_name, pretrained=pretrained)
            self.text = _CLIPTextTower(model)
            self.dim = model.ln_final.normalized_shape[0]
            self.context_length = min(context_length, model.positional_embedding.shape[0])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), context_length=self.context_length)

    @property
    def end_token_id(self) -> int:
        return self.tokenizer.eot_token_id

    def too_long(self, captions: list[str]) -> list[int]:
        """Indices of the captions that `tokenize` cuts (more tokens than the context length with its start and
        end tokens)."""
        return [i for i, c in enumerate(captions) if len(self.tokenizer.encode(c)) + 2 > self.context_length]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, tokens = self.text(ids)
        return tokens  # (B, L, D)


class _CLIPTextTower(nn.Module):
    """The text half of an open_clip `CLIP` model, returning (pooled, tokens) like TextTransformer(output_tokens)."""

    def __init__(self, model):
        super().__init__()
        self.token_embedding, self.positional_embedding = model.token_embedding, model.positional_embedding
        self.transformer, self.ln_final = model.transformer, model.ln_final
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    def forward(self, ids: torch.Tensor):
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, D)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        return None, x


class StableDiffusionTextEncoder(nn.Module):
    """transformers' CLIPTextModel + CLIPTokenizer from a diffusers Stable Diffusion directory."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        self.dim = self.model.config.hidden_size

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        max_length = self.tokenizer.model_max_length
        tokens = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return tokens.input_ids

    @property
    def end_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def too_long(self, captions: list[str]) -> list[int]:
        """Indices of the captions that `tokenize` cuts to the tokenizer's `model_max_length`."""
        limit = self.tokenizer.model_max_length
        return [i for i, ids in enumerate(self.tokenizer(list(captions)).input_ids) if len(ids) > limit]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).last_hidden_state


def build_text_encoder(source: str = "open_clip", path: str | None = None, **kwargs) -> nn.Module:
    """A frozen text encoder (see the module docstring); `path` is the Stable Diffusion directory."""
    if source not in SOURCES:
        raise ValueError(f"text_encoder.source={source!r} is not known; valid: {', '.join(SOURCES)}")
    if source == "stable_diffusion":
        if path is None or not (Path(path) / "text_encoder").is_dir():
            raise FileNotFoundError(
                f"text_encoder.path={path!r} has no text_encoder/ folder of a diffusers Stable Diffusion directory"
            )
        encoder = StableDiffusionTextEncoder(path)
    else:
        encoder = OpenCLIPTextEncoder(**kwargs)
    encoder.requires_grad_(False)
    return encoder.eval()
