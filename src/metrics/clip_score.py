"""CLIP score from image and prompt features, as the DCR evaluation defines it
(docs/replication.md#dcr-measurement).

DCR `utils_ret.gen_clipscore`: both embeddings L2-normalised, the score is the MEAN COSINE over the pairs, not x100
and not clipped at 0 (torchmetrics' `CLIPScore` is 100 * max(cos, 0)). Embedding image folders and prompts with a
CLIP model is `src.replication.clip_score`.
"""

import torch
import torch.nn.functional as F


def clip_score_from_features(image_features, text_features) -> float:
    """Mean cosine similarity between row i of `image_features` (N, D) and row i of `text_features` (N, D)."""
    image_features = torch.as_tensor(image_features).detach().double()
    text_features = torch.as_tensor(text_features).detach().double().to(image_features.device)
    if image_features.ndim != 2 or image_features.shape != text_features.shape or len(image_features) == 0:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text features {tuple(text_features.shape)} must "
            "be non-empty (N, D) matrices of the same shape, one image and one prompt per row"
        )
    cosine = (F.normalize(image_features, dim=1) * F.normalize(text_features, dim=1)).sum(dim=1)  # (N,)
    return float(cosine.mean())
