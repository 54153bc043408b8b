"""Property: copylora's safetensors reader never accepts a file that safetensors itself refuses,
and where it accepts one it reads what safetensors reads. Hypothesis mutates a small valid file's
header (dtypes, shapes, offsets, keys, metadata, padding, duplicate keys, the length field) and its
data section (cut, extended)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save

from copylora.formats.safetensors_reader import read_safetensors

BASE = save(
    {"a.lora_down.weight": torch.ones(2, 3).half(), "a.lora_up.weight": torch.full((4, 2), 2.0), "a.alpha": torch.tensor(3)},
    metadata={"ss_network_dim": "2"},
)
BASE_END = 8 + int.from_bytes(BASE[:8], "little")
BASE_HEADER = json.loads(BASE[8:BASE_END])
BASE_DATA = BASE[BASE_END:]
KEYS = [k for k in BASE_HEADER if k != "__metadata__"]

DTYPES = ["F16", "F32", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "f16", "", 3, None]
NUMBERS = st.one_of(st.integers(-2, 80), st.sampled_from([2**63, 2**64 + 1, 10**30]), st.floats(0, 8), st.none())


SAME_SIZE = {"F16": "BF16", "BF16": "F16", "F32": "I32", "I32": "F32", "I64": "F64", "F64": "I64"}


@st.composite
def header_change(draw) -> tuple:
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "metadata", "entry-type",
                                 "retype", "reshape", "reshape"]))
    key = draw(st.sampled_from(KEYS))
    if kind == "retype":  # still valid: another dtype of the same size
        return "dtype", key, SAME_SIZE[BASE_HEADER[key]["dtype"]]
    if kind == "reshape":  # still valid: the same number of elements
        count = 1
        for n in BASE_HEADER[key]["shape"]:
            count *= n
        return "shape", key, draw(st.sampled_from([[count], [1, count], [count, 1], [1, 1, count]]))
    if kind == "dtype":
        return kind, key, draw(st.sampled_from(DTYPES))
    if kind == "shape":
        return kind, key, draw(st.one_of(st.lists(NUMBERS, max_size=4), st.just("2,3")))
    if kind == "offsets":
        return kind, key, draw(st.lists(NUMBERS, min_size=0, max_size=3))
    if kind == "metadata":
        return kind, key, draw(st.one_of(st.dictionaries(st.text(max_size=3), st.one_of(st.text(max_size=3), st.integers(), st.none()), max_size=2), st.integers(), st.none()))
    if kind == "entry-type":
        return kind, key, draw(st.sampled_from([None, 1, "x", []]))
    return kind, key, None


def changed_header(changes: list[tuple]) -> dict:
    header = json.loads(json.dumps(BASE_HEADER))
    for kind, key, value in changes:
        if kind == "drop":
            header.pop(key, None)
        elif kind == "add":
            header[key + ".extra"] = {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}
        elif kind == "metadata":
            header["__metadata__"] = value
        elif kind == "entry-type":
            header[key] = value
        elif isinstance(header.get(key), dict):
            header[key][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = value
    return header


RAW_CHANGES = [
    None, None, None, None,
    ("before", b" "), ("before", b"\n"), ("before", b"\xef\xbb\xbf"),  # something before the '{'
    ("after", b"\0"), ("after", b"x"), ("after", b" " * 3),  # after the '}', within the header
    ("length", -1), ("length", 1), ("length", 8), ("length", -8),  # the header's length field
    ("cut", 1), ("cut", 2), ("cut", len(BASE_DATA)),  # the data section cut short
    ("extend", 1), ("extend", 8),  # or longer than the tensors
    ("duplicate", None),  # a key twice, as raw JSON (Python keeps the last)
]


@st.composite
def mutated_files(draw) -> bytes:
    header = changed_header(draw(st.lists(header_change(), max_size=2)))
    text, data = json.dumps(header, separators=(",", ":")).encode(), BASE_DATA
    raw_change = draw(st.sampled_from(RAW_CHANGES))
    kind, value = raw_change or (None, None)
    if kind == "duplicate":
        first = json.dumps({KEYS[0]: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})[1:-1].encode()
        text = b"{" + first + b"," + text[1:]
    elif kind == "before":
        text = value + text
    elif kind == "after":
        text += value
    text += b" " * (-len(text) % 8)  # aligned, as writers pad it
    length = len(text) + (value if kind == "length" else 0)
    if kind == "cut":
        data = data[: len(data) - value]
    elif kind == "extend":
        data += b"\0" * value
    return max(length, 0).to_bytes(8, "little") + text + data


def safetensors_reads(path: Path) -> tuple[dict, dict] | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except Exception:  # noqa: BLE001 - any refusal of safetensors' counts
        return None


@settings(max_examples=250, deadline=None)
@given(raw=mutated_files())
def test_copylora_never_accepts_what_safetensors_refuses(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(raw)
        ours = read_safetensors(path)
        if ours is None:
            return  # declined: the caller asks safetensors, which reads it or says what is wrong
        theirs = safetensors_reads(path)
        assert theirs is not None, "copylora's reader accepted a file safetensors refuses"
        tensors, metadata = theirs
        assert ours.metadata == metadata
        assert list(ours.tensors) == list(tensors)
        for key, tensor in tensors.items():
            assert ours.tensors[key].dtype == tensor.dtype and torch.equal(ours.tensors[key], tensor), key


def test_the_unmutated_file_is_read_by_both() -> None:
    """The property above is not vacuous: the base file is accepted by both readers."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(BASE)
        assert read_safetensors(path) is not None and safetensors_reads(path) is not None
