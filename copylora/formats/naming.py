"""Module names: which U-Net block a kohya LoRA module belongs to, and LBW (layer block weight) vectors.

LBW vectors follow the sd-webui-lora-block-weight convention that kohya's svd_merge_lora.py
accepts: 26 blocks BASE, IN00–IN11, MID, OUT00–OUT11, of which presets of 12, 17, 20 or 26
entries address a subset. Lengths 12 and 20 are the SDXL presets, and kohya then reads module
names in SDXL (CompVis) layout; copylora does the same so that the same vector means the same.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from copylora.errors import CopyloraError

BLOCK_NAMES: tuple[str, ...] = ("BASE", *(f"IN{i:02d}" for i in range(12)), "MID", *(f"OUT{i:02d}" for i in range(12)))
BASE, MID = 0, 13
IN_OFFSET, OUT_OFFSET = 1, 14

# Which of the 26 blocks each preset length addresses, in order.
_PRESET_BLOCKS: dict[int, tuple[str, ...]] = {
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID", *(f"OUT{i:02d}" for i in range(3, 12))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))),
    26: BLOCK_NAMES,
}
SDXL_PRESET_LENGTHS = (12, 20)
LBW_LENGTHS = tuple(sorted(_PRESET_BLOCKS))

_DIFFUSERS_UNET = re.compile(r"(up|down)_blocks_(\d+)_(resnets|attentions|upsamplers|downsamplers)_(\d+)_")
_COMPVIS_UNET = re.compile(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_(\d+)?")


def block_index(module_name: str, sdxl_layout: bool) -> int | None:
    """Index into BLOCK_NAMES of the block a module belongs to; None when it belongs to none."""
    if "text_model_encoder_" in module_name:
        return BASE
    return _compvis_block(module_name) if sdxl_layout else _diffusers_block(module_name)


def _diffusers_block(name: str) -> int | None:
    # SD1.x/2.x names (diffusers layout): 3 sub-blocks per down/up block; CompVis has no input
    # block 0 for LoRA, so down_blocks_0 resnet 0 is IN01.
    match = _DIFFUSERS_UNET.search(name)
    if match:
        direction, block, kind, sub = match.group(1), int(match.group(2)), match.group(3), int(match.group(4))
        if direction == "down":
            if kind == "downsamplers":
                return IN_OFFSET + 3 * (block + 1)
            if kind in ("resnets", "attentions"):
                return IN_OFFSET + 3 * block + sub + 1
            return None
        if kind == "upsamplers":
            return OUT_OFFSET + 3 * block + 2
        if kind in ("resnets", "attentions"):
            return OUT_OFFSET + 3 * block + sub
        return None
    if "mid_block_" in name:
        return MID
    return None


def _compvis_block(name: str) -> int | None:
    # SDXL names (CompVis layout) carry the block number directly.
    match = _COMPVIS_UNET.match(name)
    if not match:
        return None
    part, number = match.group(1), match.group(2)
    if part in ("time_embed", "label_emb"):
        return 1
    if part == "out":
        return 23
    if part == "middle_block":
        return MID
    if number is None:
        return None
    return (1 + int(number)) if part == "input_blocks" else (OUT_OFFSET + int(number))


# kohya's conv modules in SD U-Nets (tests check these against the vendored manifests): diffusers
# names (SD1/SD2) and CompVis names (SDXL). Attention proj_in/proj_out are 1×1 convs in SD1 only.
_CONV_3X3 = re.compile(
    r"^lora_unet_.*(_resnets_\d+_conv[12]|_(down|up)samplers_0_conv|_in_layers_2|_out_layers_3|_0_op|"
    r"output_blocks_\d+_\d+_conv)$"
)
_CONV_1X1 = re.compile(r"^lora_unet_.*(_conv_shortcut|_skip_connection)$")
_SD1_PROJ = re.compile(r"^lora_unet_.*_attentions_\d+_proj_(in|out)$")


def conv_kernel(module_name: str, v2: bool) -> tuple[int, int] | None:
    """The kernel of the SD U-Net conv a module adapts, from its name; None for a linear module.

    LoHa/LoKr files store 1×1 and non-Tucker 3×3 convs as 2-D factors, kohya's LoRA as 4-D ones."""
    if _CONV_3X3.match(module_name):
        return (3, 3)
    if _CONV_1X1.match(module_name) or (not v2 and _SD1_PROJ.match(module_name)):
        return (1, 1)
    return None


@dataclass(frozen=True)
class BlockWeights:
    """One model's LBW vector expanded to all 26 blocks (1.0 where the preset says nothing)."""

    weights: tuple[float, ...]
    sdxl_layout: bool
    addressed: frozenset[int]

    def for_module(self, module_name: str) -> float:
        index = block_index(module_name, self.sdxl_layout)
        return self.weights[index] if index is not None and index in self.addressed else 1.0


def parse_lbws(texts: list[str]) -> list[BlockWeights]:
    """Parse --lbws values (one JSON list per model); all must have one accepted length."""
    vectors: list[list[float]] = []
    for text in texts:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CopyloraError(f"--lbws {text!r}: not JSON ({exc.msg}); write e.g. \"[1,1,0.5,...]\"") from exc
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise CopyloraError(f"--lbws {text!r}: must be a JSON list of numbers")
        if len(value) not in _PRESET_BLOCKS:
            raise CopyloraError(f"--lbws {text!r}: has {len(value)} values; must have one of {list(LBW_LENGTHS)}")
        vectors.append([float(v) for v in value])
    if len({len(v) for v in vectors}) > 1:
        raise CopyloraError(f"--lbws: all vectors must have the same length, found {[len(v) for v in vectors]}")
    return [expand_lbw(v) for v in vectors]


def expand_lbw(vector: list[float]) -> BlockWeights:
    blocks = _PRESET_BLOCKS[len(vector)]
    indices = [BLOCK_NAMES.index(b) for b in blocks]
    weights = [1.0] * len(BLOCK_NAMES)
    for index, value in zip(indices, vector):
        weights[index] = value
    return BlockWeights(tuple(weights), len(vector) in SDXL_PRESET_LENGTHS, frozenset(indices))


# The DiT families' blocks (kohya's lora_flux/sd3/lumina/hunyuan_image/anima names): label, numbered or not
_DIT_BLOCKS = re.compile(
    r"^lora_unet_(?P<kind>double_blocks|single_blocks|joint_blocks|layers|blocks|context_refiner|noise_refiner"
    r"|final_layer|llm_adapter)_(?P<number>\d+)?"
)
_DIT_LABELS = {"double_blocks": "double", "single_blocks": "single", "joint_blocks": "joint", "layers": "layer",
               "blocks": "block"}


def block_group(module_name: str) -> str:
    """Coarse block label for reports: te, te1, te2, te3, down_N / in_N, mid, up_N / out_N; for the
    DiT families double_NN, single_NN, joint_NN, layer_NN, block_NN, context_refiner, noise_refiner,
    final_layer, llm_adapter; else other."""
    for prefix, label in (("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te")):
        if module_name.startswith(prefix):
            return label
    dit = _DIT_BLOCKS.match(module_name)
    if dit:
        kind, number = dit.group("kind"), dit.group("number")
        if kind in _DIT_LABELS and number is not None:
            return f"{_DIT_LABELS[kind]}_{int(number):02d}"
        return kind
    match = re.search(r"(down|up)_blocks_(\d+)_", module_name)
    if match:
        return f"{match.group(1)}_{match.group(2)}"
    if "mid_block_" in module_name or "middle_block_" in module_name:
        return "mid"
    match = re.search(r"(input|output)_blocks_(\d+)_", module_name)
    if match:
        return f"{'in' if match.group(1) == 'input' else 'out'}_{int(match.group(2)):02d}"
    return "other"
