"""Comparing a copylora output with a stock output, the way ../shared/README.md defines "same as stock"."""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from copylora.pipelines.fidelity import Factors, as_factors, squared_distance, squared_norm

# Metadata keys that differ by nature between two runs or two implementations.
VOLATILE_KEYS = {
    "modelspec.date",
    "modelspec.title",
    "modelspec.merged_from",
    "modelspec.implementation_version",
    "sshs_model_hash",
    "sshs_legacy_hash",
}


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def data_section_sha256(path: Path) -> str:
    raw = Path(path).read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[header_end:]).hexdigest()


def module_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, Factors]:
    """Per module, the delta up @ down · alpha / rank as a float64 factor pair (conv flattened).

    Kept factored: norms and differences of deltas come from small Gram matrices, which is
    exact and far cheaper than forming out×in matrices for every module.
    """
    deltas = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
        deltas[name] = as_factors(tensors[f"{name}.lora_up.weight"], down, alpha / rank)
    return deltas


def relative_error(ours: Factors, ref: Factors) -> float:
    """‖ours − ref‖_F / ‖ref‖_F; two all-zero deltas agree exactly."""
    ref_sq, diff_sq = squared_norm(ref), squared_distance(ours, ref)
    if ref_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else float("inf")
    return (diff_sq / ref_sq) ** 0.5


@dataclass
class Comparison:
    errors: dict[str, float]

    @property
    def median(self) -> float:
        return statistics.median(self.errors.values())

    @property
    def worst(self) -> float:
        return max(self.errors.values())


def compare_deltas(ours: dict[str, Factors], ref: dict[str, Factors]) -> Comparison:
    assert ours.keys() == ref.keys()
    return Comparison({name: relative_error(ours[name], ref[name]) for name in ref})


def assert_same_format(ours_path: Path, ref_path: Path) -> None:
    """Same keys, shapes, dtypes; same metadata keys; equal ss_* values; model hash = data sha256."""
    ours, ref = load_file(str(ours_path)), load_file(str(ref_path))
    assert ours.keys() == ref.keys()
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        assert ours[key].dtype == ref[key].dtype, key
    ours_md, ref_md = read_metadata(ours_path), read_metadata(ref_path)
    assert ours_md.keys() == ref_md.keys()
    for key in ref_md:
        if key.startswith("ss_"):
            if key == "ss_network_args":
                assert json.loads(ours_md[key]) == json.loads(ref_md[key])
            assert ours_md[key] == ref_md[key], key
        elif key not in VOLATILE_KEYS and key != "modelspec.implementation":
            assert ours_md[key] == ref_md[key], key
    assert ours_md["sshs_model_hash"] == data_section_sha256(ours_path)
