"""Which model family a LoRA is for (SD 1.x/2.x, SDXL, SD3, FLUX.1, Lumina, HunyuanImage, Anima),
from its metadata or else its module names, and the family metadata a merge of them carries.

kohya writes the family into `ss_base_model_version` and `modelspec.architecture` (values from
sd-scripts' library/*_utils.py and sai_model_spec.py) and trains each DiT family with its own
network module (`networks.lora_flux`, ...). Stock's merge knows only SD and labels anything else
an SD1.5 LoRA; copylora keeps the inputs' family instead, where they agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from copylora.errors import CopyloraError

ARCHITECTURE = "modelspec.architecture"
FAMILY_KEYS = ("modelspec.architecture", "modelspec.implementation", "modelspec.resolution")
LORA_SUFFIX = "/lora"


@dataclass(frozen=True)
class Family:
    name: str
    lora_module: str  # kohya's LoRA network module for it
    architectures: tuple[str, ...]  # modelspec.architecture prefixes
    base_versions: tuple[str, ...]  # ss_base_model_version prefixes
    names: re.Pattern[str]  # module names only this family's networks make
    stock: bool = False  # stock's merge derives this family's metadata itself (kept byte for byte)

    @property
    def has_lbw(self) -> bool:
        """kohya defines layer block weights for the SD U-Nets only."""
        return self.stock


FAMILIES = (
    Family("SD 1.x/2.x", "networks.lora", ("stable-diffusion-v1", "stable-diffusion-v2"), ("sd_v1", "sd_v2"),
           re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_"), stock=True),
    Family("SDXL", "networks.lora", ("stable-diffusion-xl",), ("sdxl",),
           re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_"), stock=True),
    Family("SD3", "networks.lora_sd3", ("stable-diffusion-3",), ("sd3",), re.compile(r"^lora_unet_joint_blocks_")),
    # FLUX.1 and HunyuanImage share their block names; their modulation and MLP layers differ. PEFT
    # files (ai-toolkit, diffusers) name FLUX.1's single blocks as diffusers' FluxTransformer2DModel does.
    Family("FLUX.1", "networks.lora_flux", ("flux-1", "chroma"), ("flux1", "chroma"),
           re.compile(r"^(lora_unet_(double|single)_blocks_\d+_((img|txt)_mod_lin|(img|txt)_mlp_[02]|modulation_lin)$"
                      r"|(transformer\.)?single_transformer_blocks\.\d+\.)")),
    Family("HunyuanImage", "networks.lora_hunyuan_image", ("hunyuan-image",), ("hunyuan-image",),
           re.compile(r"^lora_unet_(double|single)_blocks_\d+_((img|txt)_mod_linear|(img|txt)_mlp_fc[12]|modulation_linear)$")),
    Family("Lumina", "networks.lora_lumina", ("lumina",), ("lumina",),
           re.compile(r"^lora_unet_(layers|context_refiner|noise_refiner)_\d+_")),
    Family("Anima", "networks.lora_anima", ("anima",), ("anima",), re.compile(r"^lora_unet_(blocks_\d+|llm_adapter)_")),
)


def from_metadata(metadata: Mapping[str, str]) -> Family | None:
    """The family the file's metadata names (architecture, then base model version, then network module)."""
    architecture = metadata.get(ARCHITECTURE, "").removesuffix(LORA_SUFFIX)
    version = metadata.get("ss_base_model_version", "")
    module = metadata.get("ss_network_module", "")
    for family in FAMILIES:
        if architecture and architecture.startswith(family.architectures):
            return family
    for family in FAMILIES:
        if version and version.startswith(family.base_versions):
            return family
    return next((f for f in FAMILIES if not f.stock and module == f.lora_module), None)


def from_names(names: list[str]) -> Family | None:
    """The family whose networks alone make some of these module names."""
    return next((family for family in FAMILIES if any(family.names.match(name) for name in names)), None)


@dataclass(frozen=True)
class Input:
    path: Path
    metadata: Mapping[str, str]
    names: list[str]

    @property
    def family(self) -> Family | None:
        return from_metadata(self.metadata) or from_names(self.names)


def one_family(inputs: list[Input]) -> Family | None:
    """The inputs' family; CopyloraError naming both when two inputs are for different families
    (or, families unknown, share no module name at all), or one file mixes two families' names."""
    first: Input | None = None
    for item in inputs:
        named = [f.name for f in FAMILIES if any(f.names.match(name) for name in item.names)]
        if len(named) > 1:
            raise CopyloraError(f"{item.path}: mixes module names of {' and '.join(named)} (one file, two models?)")
        family = item.family
        if family is None:
            continue
        if first is not None and first.family is not family:
            raise CopyloraError(
                f"{item.path}: a {family.name} LoRA, but {first.path} is a {first.family.name} LoRA "  # type: ignore[union-attr]
                "(merge LoRAs of one model family)"
            )
        first = first or item
    for a, b in zip(inputs, inputs[1:]):
        if a.names and b.names and not set(a.names) & set(b.names) and a.family is None and b.family is None:
            raise CopyloraError(f"{b.path}: shares no module name with {a.path} (LoRAs for different models?)")
    return first.family if first is not None else None


def relabel(metadata: dict[str, str], family: Family | None, inputs: list[Mapping[str, str]]) -> None:
    """Make a merge's metadata say the DiT family its inputs are for (stock labels them SD1.5): the
    family's LoRA network module, and ss_base_model_version and the modelspec architecture,
    implementation and resolution from the inputs that have them where they agree (a key they
    disagree on or lack is left out, rather than an SD value). The SD families are left to stock's
    own derivation."""
    if family is None or family.stock:
        return
    metadata["ss_network_module"] = family.lora_module
    for key in ("ss_base_model_version", *FAMILY_KEYS):
        if key not in metadata and key != "ss_base_model_version":
            continue  # --no_metadata: no modelspec at all
        values = {m[key] for m in inputs if key in m}
        if len(values) != 1:
            metadata.pop(key, None)
            continue
        value = values.pop()
        metadata[key] = value + LORA_SUFFIX if key == ARCHITECTURE and not value.endswith(LORA_SUFFIX) else value
