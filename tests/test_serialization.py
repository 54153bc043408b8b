"""Serialize once: the written file and the sshs_* hashes come from one serialization, and both are
byte-for-byte what serializing with safetensors twice (once per purpose) gave before."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save

from copylora.formats.kohya_metadata import HASH_PLACEHOLDERS, LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET, weight_hashes
from copylora.formats.lora_file import SerializedTensors, write_lora

METADATA = {
    "ss_network_dim": "16",
    "ss_network_args": json.dumps({"conv_dim": 8, "note": 'quotes " and \\ and \n newline'}),
    "ss_output_name": "コピー機 LoRA",  # non-ASCII stays UTF-8, as safetensors writes it
    "modelspec.title": "diff",
    "modelspec.date": "2026-11-26T12:00:00",
}


def tensors(elements: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(elements)
    return {
        "lora_unet_b.lora_up.weight": torch.randn(elements, 4, generator=gen).half(),
        "lora_unet_a.lora_down.weight": torch.randn(4, elements, generator=gen).half(),
        "lora_unet_a.alpha": torch.tensor(16),
        "lora_te_c.lora_down.weight": torch.randn(3, 5, 3, 3, generator=gen).to(torch.bfloat16),
        "lora_te_c.lora_up.weight": torch.randn(7, 3, 1, 1, generator=gen),
    }


def canonicalised_twice_serialized(values: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """What write_lora wrote before: safetensors' own bytes, header re-ordered (metadata sorted,
    tensors by offset) and the data section copied unchanged."""
    raw = save(values, metadata=metadata)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:header_end])
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    ordered.update(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[header_end:]


def hashes_of_a_separate_serialization(values: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_* as computed before: over safetensors' bytes with only the ss_* metadata."""
    raw = save(values, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(raw[:8], "little")
    legacy = raw[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return {
        "sshs_model_hash": hashlib.sha256(raw[header_end:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(legacy).hexdigest()[:8],
    }


@pytest.mark.parametrize("elements", [10, 70_000, 300_000], ids=["tiny", "window-straddles", "large"])
def test_written_bytes_and_hashes_are_unchanged(tmp_path, elements):
    values = tensors(elements)
    serialized = SerializedTensors.of(values)
    assert weight_hashes(serialized, METADATA) == hashes_of_a_separate_serialization(values, METADATA)
    assert weight_hashes(values, METADATA) == weight_hashes(serialized, METADATA)
    path = tmp_path / "out.safetensors"
    write_lora(path, values, METADATA, serialized)
    assert path.read_bytes() == canonicalised_twice_serialized(values, METADATA)
    write_lora(tmp_path / "again.safetensors", values, METADATA)  # serialized on its own: same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("elements", [10, 70_000, 300_000], ids=["tiny", "window-straddles", "large"])
def test_hashes_computed_while_writing_are_those_of_the_written_file(tmp_path, elements):
    """write_lora(data_hashes=weight_hashes) fills the placeholders with the hashes of what it wrote:
    the same file as writing metadata whose hashes were computed first."""
    values = tensors(elements)
    serialized = SerializedTensors.of(values)
    write_lora(tmp_path / "while.safetensors", values, {**METADATA, **HASH_PLACEHOLDERS}, data_hashes=weight_hashes)
    write_lora(tmp_path / "first.safetensors", values, {**METADATA, **weight_hashes(serialized, METADATA)})
    assert (tmp_path / "while.safetensors").read_bytes() == (tmp_path / "first.safetensors").read_bytes()


def test_a_hash_longer_than_its_placeholder_writes_nothing(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(ValueError, match="longer than its placeholder"):
        write_lora(path, tensors(10), {**METADATA, **HASH_PLACEHOLDERS},
                   data_hashes=lambda layout, metadata: {"sshs_legacy_hash": "0" * 80})
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_header_longer_than_the_legacy_offset(tmp_path):
    """The legacy window may start inside the header (huge metadata): it is still the file's bytes."""
    values = tensors(70_000)
    metadata = {**METADATA, "ss_training_comment": "x" * (LEGACY_HASH_OFFSET + 100)}
    serialized = SerializedTensors.of(values)
    path = tmp_path / "big-header.safetensors"
    write_lora(path, values, {k: v for k, v in metadata.items() if k.startswith("ss_")}, serialized)
    raw = path.read_bytes()
    legacy = hashlib.sha256(raw[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    assert weight_hashes(serialized, metadata)["sshs_legacy_hash"] == legacy


def test_dtype_order_and_names_are_safetensors_own():
    """SerializedTensors orders by its own dtype table; safetensors must agree for every dtype in it."""
    from copylora.formats.safetensors_format import SAFETENSORS_DTYPES

    values = {f"t{index:02d}_{name}": torch.ones(3, dtype=dtype) for index, (dtype, name) in
              enumerate(SAFETENSORS_DTYPES.items())}
    values |= {f"u{index:02d}": torch.ones(2, dtype=dtype) for index, dtype in enumerate(SAFETENSORS_DTYPES)}
    raw = save(values)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    theirs = json.loads(raw[8:header_end])
    ours = SerializedTensors.of(values)
    assert list(ours.entries) == sorted(theirs, key=lambda name: theirs[name]["data_offsets"][0])
    assert ours.entries == theirs
    assert b"".join(ours.chunks) == raw[header_end:]


def test_a_dtype_outside_the_table_is_laid_out_by_safetensors():
    values = {"b.weight": torch.ones(3, dtype=torch.complex64), "a.weight": torch.ones(2, dtype=torch.float16)}
    raw = save(values)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    ours = SerializedTensors.of(values)
    assert ours.entries == json.loads(raw[8:header_end])
    assert b"".join(ours.chunks) == raw[header_end:]
