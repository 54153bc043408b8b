"""Kohya's metadata for a merged LoRA: the minimal `ss_*` keys, the `sshs_*` hashes and `modelspec.*`.

The definitions follow what stock sd-scripts writes (checked against real stock outputs in
tests/test_golden.py): the hashes are taken over the file as it would be saved with only the
`ss_*` metadata, so they identify the weights, not the descriptive metadata added afterwards.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from copylora import __version__
from copylora.errors import CopyloraError
from copylora.formats.lora_file import SerializedTensors

SS_V2 = "ss_v2"
SS_BASE_MODEL_VERSION = "ss_base_model_version"

MODELSPEC_VERSION = "1.0.1"
IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class BaseModelInfo:
    """What the inputs say about the base model (first input that says it wins, like stock)."""

    v2: str | None  # "True"/"False" as kohya stores it, None when no input says
    base_model_version: str | None

    @property
    def is_v2(self) -> bool:
        return self.v2 == "True"

    @property
    def is_sdxl(self) -> bool:
        return self.base_model_version is not None and self.base_model_version.lower().startswith("sdxl")

    @classmethod
    def from_metadata(cls, metadatas: list[Mapping[str, str]]) -> "BaseModelInfo":
        v2 = next((m[SS_V2] for m in metadatas if SS_V2 in m), None)
        base = next((m[SS_BASE_MODEL_VERSION] for m in metadatas if SS_BASE_MODEL_VERSION in m), None)
        return cls(v2=v2, base_model_version=base)


def network_metadata(
    base: BaseModelInfo, dim: str, alpha: str, network_args: Mapping[str, object] | None
) -> dict[str, str]:
    """The minimal ss_* keys kohya's merge and resize scripts write."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": alpha}
    if base.v2 is not None:
        metadata[SS_V2] = base.v2
    if base.base_model_version is not None:
        metadata[SS_BASE_MODEL_VERSION] = base.base_model_version
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(dict(network_args))
    return metadata


CONVERTED_FROM = "copylora_converted_from"  # LoHa/LoKr inputs: what the LoRA pairs were computed from


def converted_from(inputs: list[tuple[str, set[str], Mapping[str, str]]]) -> dict[str, str]:
    """{CONVERTED_FROM: "title: LoHa (networks.loha); ..."} when an input (title, its modules' kinds,
    its metadata) has modules that were not kohya LoRA pairs; else nothing."""
    notes = []
    for title, kinds, metadata in inputs:
        adapters = sorted(kinds - {"LoRA"})
        if adapters:
            module = metadata.get("ss_network_module")
            notes.append(f"{title}: {', '.join(adapters)}" + (f" ({module})" if module else ""))
    return {CONVERTED_FROM: "; ".join(notes)} if notes else {}


# What build_metadata puts where the sshs_* hashes go: values of their final length, which
# write_lora replaces with weight_hashes() of the data it writes (computed while writing it).
HASH_PLACEHOLDERS = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}


def weight_hashes(
    tensors: Mapping[str, torch.Tensor] | SerializedTensors, metadata: Mapping[str, str]
) -> dict[str, str]:
    """sshs_model_hash and sshs_legacy_hash, as sd-webui-additional-networks defines them.

    model hash: sha256 of the bytes after the safetensors header (the tensor data);
    legacy hash: first 8 hex digits of the sha256 of 64 KiB at offset 1 MiB of the whole file.
    Both over the file serialized with only the ss_* metadata; pass the tensors already
    serialized to hash the bytes that will be written.
    """
    layout = tensors if isinstance(tensors, SerializedTensors) else SerializedTensors.of(tensors)
    model_hash = hashlib.sha256()
    for chunk in layout.chunks:
        model_hash.update(chunk)
    header = layout.header({k: v for k, v in metadata.items() if k.startswith("ss_")})
    # the window of the whole file, from the header and the data without joining them
    start, end = LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH
    legacy = header[start:end] + layout.data_window(max(start - len(header), 0), max(end - len(header), 0))
    return {"sshs_model_hash": model_hash.hexdigest(), "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8]}


def build_time() -> float:
    """Now, or SOURCE_DATE_EPOCH when it is set: the reproducible-builds convention, so the same
    inputs give the same file, date stamp included."""
    stamp = os.environ.get("SOURCE_DATE_EPOCH")
    if stamp is None:
        return time.time()
    if not stamp.isdigit():
        raise CopyloraError(f"SOURCE_DATE_EPOCH={stamp!r}: must be whole seconds since 1970 (e.g. 1767225600)")
    return float(stamp)


def modelspec_metadata(
    base: BaseModelInfo, title: str, merged_from: list[str], timestamp: float | None = None
) -> dict[str, str]:
    """sai model spec 1.0.1 keys for a merged LoRA.

    Like stock, a v2 input is declared v-prediction (a LoRA does not say which it is).
    """
    v_prediction = base.is_v2
    if base.is_sdxl:
        architecture, resolution = "stable-diffusion-xl-v1-base", "1024x1024"
    elif base.is_v2:
        architecture, resolution = "stable-diffusion-v2-768-v", "768x768"
    else:
        architecture, resolution = "stable-diffusion-v1", "512x512"
    when = int(build_time() if timestamp is None else timestamp)
    return {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": IMPL_STABILITY if base.is_sdxl else IMPL_DIFFUSERS,
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(when).isoformat(),
        "modelspec.merged_from": ", ".join(merged_from),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": f"copylora/{__version__}",
    }
