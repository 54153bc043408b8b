"""Reading a .safetensors file as views of one in-memory copy of it.

A LoRA file is thousands of small tensors. safetensors' `load_file` copies each one out
(about 0.1 s for an SDXL LoRA's 3000), and checking each for NaN/Inf one call at a time costs
almost as much again. Here the file is read in one call into one buffer, each tensor is a view of
it, and the NaN/Inf check runs once over each run of same-dtype tensors, which lie next to each
other in the file. The buffer is a copy, not a mapping of the file: a trainer rewriting the file
while a merge runs would turn a mapping's pages into SIGBUS, which kills the process unannounced.

This reader vouches only for files it fully understands: a header whose entries tile the data
section exactly (what safetensors itself requires), dtypes in its table, offsets aligned to the
dtype. For anything else `read_safetensors` returns None and the caller uses safetensors, which
then also says what is wrong with the file.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from copylora.formats.safetensors_format import SAFETENSORS_DTYPES

HEADER_LENGTH_BYTES = 8  # little-endian u64, then that many bytes of JSON header
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses longer headers ("header too large")
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass
class SafetensorsContents:
    tensors: dict[str, torch.Tensor]  # views of one buffer, in file order (as safetensors' load_file)
    metadata: dict[str, str]
    # each run of adjacent same-dtype float tensors as one flat view: a NaN/Inf check per run
    float_runs: list[torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors(path: Path) -> SafetensorsContents | None:
    """The file's tensors and metadata, or None where safetensors itself should read it.

    Raises OSError when the file cannot be read.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES or int.from_bytes(prefix, "little") > min(MAX_HEADER_BYTES, size):
            return None  # short, or a header safetensors refuses: it says what is wrong, before reading it
        buffer = torch.empty(size, dtype=torch.uint8)  # uninitialised: readinto fills it
        file.seek(0)
        if file.readinto(memoryview(buffer.numpy())) != size or file.read(1):
            return None  # the file changed size while being read: safetensors reads what is there now
    parsed = _parse_header(buffer)
    if parsed is None:
        return None
    entries, metadata, data_start = parsed
    tensors = {entry.key: _view(buffer, entry, data_start) for entry in entries}
    return SafetensorsContents(tensors, metadata, _float_runs(buffer, entries, data_start))


def _parse_header(buffer: torch.Tensor) -> tuple[list[_Entry], dict[str, str], int] | None:
    """Entries in file order, metadata and where the data starts; None unless all is well formed."""
    raw = memoryview(buffer.numpy())
    length = int.from_bytes(raw[:HEADER_LENGTH_BYTES], "little")
    data_start = HEADER_LENGTH_BYTES + length
    if data_start > len(raw):
        return None
    try:
        header = json.loads(bytes(raw[HEADER_LENGTH_BYTES:data_start]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None)  # absent or null: none; 0, "", [] are refused, as safetensors does
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    entries = []
    for key, info in header.items():
        entry = _entry(key, info, data_start)
        if entry is None:
            return None
        entries.append(entry)
    entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in entries:  # the tensors must tile the data section, as safetensors requires
        if entry.begin != position:
            return None
        position = entry.end
    if data_start + position != buffer.numel():
        return None
    return entries, metadata, data_start


def _entry(key: str, info: object, data_start: int) -> _Entry | None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        return None
    dtype = DTYPES_BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    shape, offsets = info["shape"], info["data_offsets"]
    if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None
    if not all(type(n) is int and n >= 0 for n in (*shape, *offsets)):
        return None
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize or (data_start + begin) % dtype.itemsize:
        return None  # wrong size, or a view that would be misaligned for its dtype
    return _Entry(key, dtype, tuple(shape), begin, end)


def _flat(buffer: torch.Tensor, dtype: torch.dtype, start: int, end: int) -> torch.Tensor:
    """Bytes [start, end) of the buffer as a flat tensor of `dtype` that shares its memory."""
    if end == start:
        return torch.empty(0, dtype=dtype)
    return buffer[start:end].view(dtype)


def _view(buffer: torch.Tensor, entry: _Entry, data_start: int) -> torch.Tensor:
    return _flat(buffer, entry.dtype, data_start + entry.begin, data_start + entry.end).view(entry.shape)


def _float_runs(buffer: torch.Tensor, entries: list[_Entry], data_start: int) -> list[torch.Tensor]:
    """Each run of adjacent same-dtype float entries (they tile the data section) as one flat tensor."""
    runs = []
    for dtype, group in itertools.groupby(entries, key=lambda entry: entry.dtype):
        run = list(group)
        if dtype.is_floating_point and run[-1].end > run[0].begin:
            runs.append(_flat(buffer, dtype, data_start + run[0].begin, data_start + run[-1].end))
    return runs
