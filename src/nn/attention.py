"""Cross-attention of a diffusers UNet, observed and re-weighted through an attention processor (no fork of the
UNet): what the attention-entropy detector reads and what the attention re-scaling mitigation changes
(docs/detection.md).

`cross_attention(unet, ...)` puts a `CrossAttentionProcessor` on every cross-attention layer (diffusers
`Attention` modules with `is_cross_attention`) for the duration of a `with` block and restores the layers' own
processors afterwards. The processor computes attention as diffusers' plain `AttnProcessor` does (same
projections, same scale, same softmax), with three additions:

- `keep` (B, L) bool: text positions outside it get -inf before the softmax (Ren et al.'s mask of the padding
  after the first end token);
- `start_scale` on the rows of `conditional` (B,) bool: the pre-softmax logit of text position 0 (the start
  token) is multiplied by it (Ren et al.'s mitigation; 1 leaves the attention as it is);
- `record`: the probabilities averaged over the query (pixel) positions, (B, heads, L), appended per call to the
  layer's list in `Probe.layers`, in the order the UNet calls its layers.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention


@dataclass
class Probe:
    """What the processors share: the options of the current forward passes and what they recorded."""

    record: bool = False
    start_scale: float = 1.0
    conditional: torch.Tensor | None = None  # (B,) bool: the rows whose start-token logit is scaled
    keep: torch.Tensor | None = None  # (B, L) bool: text positions that take part in the softmax
    layers: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def clear(self) -> None:
        self.layers = {name: [] for name in self.layers}

    def mean_over_layers(self, names: list[str] | None = None, call: int = -1) -> torch.Tensor:
        """(B, L): the recorded probabilities of one call of each layer (the last by default), averaged over the
        heads and over the layers `names` (all cross-attention layers when None)."""
        names = list(self.layers) if names is None else names
        return torch.stack([self.layers[name][call].mean(1) for name in names]).mean(0)


class CrossAttentionProcessor:
    """diffusers' `AttnProcessor` for a cross-attention layer, with the mask, start-token scale and recording of
    its `Probe` (see the module docstring)."""

    def __init__(self, name: str, probe: Probe):
        self.name = name
        self.probe = probe

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        probe = self.probe
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        query = attn.head_to_batch_dim(query)  # (B * heads, Q, d), batch-major
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        logits = torch.bmm(query.float(), key.float().transpose(-1, -2)) * attn.scale  # (B * heads, Q, L)
        if attention_mask is not None:
            logits = logits + attn.prepare_attention_mask(attention_mask, context.shape[1], batch).float()
        if probe.start_scale != 1.0 and probe.conditional is not None:
            rows = probe.conditional.to(logits.device).repeat_interleave(heads)
            logits[rows, :, 0] = logits[rows, :, 0] * probe.start_scale
        if probe.keep is not None:
            keep = probe.keep.to(logits.device).repeat_interleave(heads, dim=0)[:, None, :]
            logits = logits.masked_fill(~keep, float("-inf"))
        probs = logits.softmax(dim=-1)
        if probe.record:
            probe.layers[self.name].append(probs.mean(1).view(batch, heads, -1).detach())
        hidden_states = torch.bmm(probs.to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, Attention]:
    """The cross-attention layers of `unet`, by module name, in the order of the forward pass of the diffusers
    UNets: down blocks, middle block, up blocks (`named_modules` lists the middle block last)."""
    found = [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    ]
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    found.sort(key=lambda item: rank.get(item[0].split(".")[0], 1))  # stable: keeps the order inside a part
    return dict(found)


@contextmanager
def cross_attention(unet: torch.nn.Module, **options):
    """Within the block, every cross-attention layer of `unet` runs `CrossAttentionProcessor` with one shared
    `Probe(**options)`, which the block receives; the layers' own processors are restored on exit. ValueError
    when `unet` has no cross-attention (an unconditional model)."""
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention layers (an unconditional model?): attention "
            "detectors and mitigations need a text-conditional UNet"
        )
    probe = Probe(**options)
    probe.layers = {name: [] for name in layers}
    saved = {name: layer.processor for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.set_processor(CrossAttentionProcessor(name, probe))
    try:
        yield probe
    finally:
        for name, layer in layers.items():
            layer.set_processor(saved[name])
