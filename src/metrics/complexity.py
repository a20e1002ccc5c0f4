"""Image complexity of the matched training images and its correlation with copying
(docs/replication.md#dcr-measurement).

Follows somepago/DCR `diff_retrieval.py`: each generation's top-1 training image is read at Resize(224) ->
CenterCrop(224) and scored three ways, and each score is correlated (Pearson, `scipy.stats.pearsonr`) with the
generations' top-1 similarities, to test whether simple images are copied more:
- grey-level entropy: `sklearn.metrics.cluster.entropy(img_as_ubyte(rgb2gray(rgb)))`, the Shannon entropy in nats
  (natural log) of the 8-bit grey-level histogram;
- JPEG size: the image encoded at quality 90, in KB (bytes / 1024);
- total variation: DCR `tv_loss` (L1, weight 1e-4) of the 0-255 image, 1e-4 * (sum |x[:, i+1] - x[:, i]| +
  sum |x[i+1, :] - x[i, :]|) over the three channels.
Two differences, both in the scores' last digits: the image stays exact uint8 (DCR rounds through ToTensor * 255
and truncates with `astype(uint8)`), and JPEG goes through Pillow on the RGB image (DCR calls `cv2.imencode`, which
reads the RGB array as BGR; both use libjpeg with 4:2:0 chroma subsampling).
"""

import io
import warnings

import numpy as np
import torch
from PIL import Image
from scipy import stats
from skimage import color, img_as_ubyte
from torchvision import transforms as T

COMPLEXITY_SIZE = 224
MEASURES = ("entropy", "jpeg_kb", "tv")


def complexity_image(image: Image.Image, size: int = COMPLEXITY_SIZE) -> np.ndarray:
    """The DCR complexity view of a PIL RGB image: Resize(size) (bilinear, shorter side) -> CenterCrop(size) ->
    (size, size, 3) uint8 array."""
    if image.mode != "RGB":
        raise ValueError(
            f"complexity_image takes RGB images, got mode {image.mode!r}: convert with .convert('RGB')"
        )
    return np.asarray(T.CenterCrop(size)(T.Resize(size)(image)))


def _check_rgb(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB array, got shape {rgb.shape} and dtype {rgb.dtype}"
        )
    return rgb


def grey_entropy(rgb) -> float:
    """Shannon entropy (nats) of the 8-bit grey-level histogram of an (H, W, 3) uint8 image (skimage `rgb2gray`,
    then `img_as_ubyte`). 0 for a flat image, ln 256 ~ 5.545 at most."""
    grey = img_as_ubyte(color.rgb2gray(_check_rgb(rgb)))  # (H, W) uint8
    counts = np.bincount(grey.ravel(), minlength=256)
    p = counts[counts > 0] / grey.size
    return float(-(p * np.log(p)).sum())


def jpeg_kilobytes(rgb, quality: int = 90) -> float:
    """Size in KB (1024 bytes) of an (H, W, 3) uint8 image encoded as JPEG at `quality` (Pillow, 4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(_check_rgb(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1024


def total_variation(rgb, weight: float = 1e-4) -> float:
    """DCR `tv_loss` with norm="l1": weight * (sum of |horizontal| + |vertical| neighbour differences) of an
    (H, W, 3) uint8 image taken as 0-255 values, summed over the channels."""
    x = _check_rgb(rgb).astype(np.float64)
    return float(weight * (np.abs(np.diff(x, axis=0)).sum() + np.abs(np.diff(x, axis=1)).sum()))


def image_complexity(rgb) -> dict[str, float]:
    """{"entropy", "jpeg_kb", "tv"} of an (H, W, 3) uint8 image (see the functions above)."""
    return {"entropy": grey_entropy(rgb), "jpeg_kb": jpeg_kilobytes(rgb), "tv": total_variation(rgb)}


def pearson(x, y) -> tuple[float, float]:
    """Pearson r and its two-sided p-value (`scipy.stats.pearsonr`); (nan, nan) when fewer than 3 pairs or either
    vector is constant (r is undefined there, and scipy would warn)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"pearson needs two 1-D vectors of the same length, got shapes {x.shape} and {y.shape}"
        )
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        # Near-constant input: scipy warns, but r is still returned.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.pearsonr(x, y)
    return float(result.statistic), float(result.pvalue)


def complexity_correlations(top1, complexity: dict[str, np.ndarray]) -> dict[str, float]:
    """Pearson correlation of the (G,) top-1 similarities with each (G,) complexity measure of the matched training
    images: {cc_<measure>, pval_<measure>} (DCR logs them as cc_ent, cc_comp, cc_tvl and pval_*)."""
    top1 = torch.as_tensor(top1).detach().cpu().double().numpy()
    out = {}
    for name, values in complexity.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != top1.shape:
            raise ValueError(f"complexity '{name}' has shape {values.shape}, top1 has {top1.shape}")
        out[f"cc_{name}"], out[f"pval_{name}"] = pearson(values, top1)
    return out
