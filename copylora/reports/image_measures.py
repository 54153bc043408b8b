"""Did only the intended change happen? Measures of an image against a reference of the same size.

No model weights, only colour science (scikit-image), computed in CIELAB (sRGB, D65):
- structure kept: SSIM of the lightness channel L* (1 = same composition and detail; colour is ignored);
- colour change: the mean CIEDE2000 ΔE per pixel (0 = identical, about 1 = just noticeable on flat colour);
- chroma change: the mean change of chroma C* = hypot(a*, b*), signed (negative = less colourful);
- changed share: the share of pixels whose ΔE is above CHANGED_DELTA_E, and the ΔE map itself (a heatmap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from copylora.errors import CopyloraError
from copylora.formats.atomic_file import atomic_write

# ΔE00 of 1 is the just-noticeable difference for flat patches side by side; about 2 is the usual rule of thumb
# for "visible at a glance", which is what a viewer of a picture grid notices.
CHANGED_DELTA_E = 2.0
HEATMAP_FULL_SCALE = 40.0  # ΔE00 drawn at full brightness: the heatmaps of a grid share one scale
SSIM_WINDOW = 7  # scikit-image's default window (pixels on a side)
# black -> red -> yellow -> white: brightness grows with ΔE, readable without a legend and in greyscale
_HEAT_STOPS = np.array([[0, 0, 0], [200, 0, 0], [255, 210, 0], [255, 255, 255]], dtype=np.float64)


@dataclass(frozen=True)
class Measures:
    structure_kept: float  # SSIM of L*, in [-1, 1]; 1 = same structure
    delta_e: float  # mean CIEDE2000 ΔE
    delta_chroma: float  # mean C*(after) - C*(before); negative = less colourful
    changed_share: float  # share of pixels with ΔE > CHANGED_DELTA_E

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def headline(self) -> str:
        """The two numbers a grid cell carries (ASCII: Pillow's built-in font has no Δ)."""
        return f"S {self.structure_kept:.2f}  dE {self.delta_e:.1f}"


def signed(value: float, digits: int) -> str:
    """A signed number as shown, without "-0.00" for a tiny negative one."""
    return f"{round(value, digits) + 0.0:+.{digits}f}"


def read_rgb(path: Path) -> np.ndarray:
    """An image file as an H x W x 3 uint8 array (alpha dropped, palette and grey expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError as exc:
        raise CopyloraError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise CopyloraError(f"{path}: a folder, not an image") from exc
    except UnidentifiedImageError as exc:
        raise CopyloraError(f"{path}: not an image Pillow can read") from exc
    except OSError as exc:
        raise CopyloraError(f"{path}: cannot read ({exc})") from exc


def compare(before: np.ndarray, after: np.ndarray) -> tuple[Measures, np.ndarray]:
    """The measures of `after` against `before` (H x W x 3 uint8, same size) and the per-pixel ΔE map."""
    from skimage.color import deltaE_ciede2000, rgb2lab
    from skimage.metrics import structural_similarity

    if before.shape != after.shape:
        raise ValueError(f"sizes differ: {before.shape} vs {after.shape}")
    if min(before.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"{before.shape[1]}x{before.shape[0]}: smaller than SSIM's {SSIM_WINDOW}-pixel window")
    lab_before, lab_after = rgb2lab(before), rgb2lab(after)
    structure = structural_similarity(lab_before[..., 0], lab_after[..., 0], win_size=SSIM_WINDOW, data_range=100.0)
    delta_e = deltaE_ciede2000(lab_before, lab_after)
    chroma_change = np.hypot(lab_after[..., 1], lab_after[..., 2]) - np.hypot(lab_before[..., 1], lab_before[..., 2])
    measures = Measures(float(structure), float(delta_e.mean()), float(chroma_change.mean()),
                        float((delta_e > CHANGED_DELTA_E).mean()))
    return measures, delta_e


def heatmap(delta_e: np.ndarray) -> np.ndarray:
    """The ΔE map as an H x W x 3 uint8 picture: black = unchanged, white = ΔE ≥ HEATMAP_FULL_SCALE."""
    position = np.clip(delta_e / HEATMAP_FULL_SCALE, 0.0, 1.0) * (len(_HEAT_STOPS) - 1)
    low = np.minimum(position.astype(np.int64), len(_HEAT_STOPS) - 2)
    weight = (position - low)[..., None]
    colours = _HEAT_STOPS[low] * (1 - weight) + _HEAT_STOPS[low + 1] * weight
    return np.round(colours).astype(np.uint8)


def write_png(picture: np.ndarray, path: Path) -> Path:
    """Save an H x W x 3 uint8 array as a PNG (temp file, then rename)."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(picture, "RGB").save(tmp, format="PNG"))
    return path
