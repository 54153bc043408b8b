"""copylora's own safetensors reader: the same tensors, order and metadata as safetensors' load_file
wherever it answers, and no answer (None: safetensors reads the file) where it cannot vouch for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from copylora.errors import CopyloraError
from copylora.formats.lora_file import read_lora
from copylora.formats.safetensors_format import SAFETENSORS_DTYPES
from copylora.formats.safetensors_reader import MAX_HEADER_BYTES, read_safetensors
from tests.conftest import REPO

VENDORED = sorted((REPO / "tests" / "data").rglob("*.safetensors"))


def assert_same_as_safetensors(path: Path) -> None:
    contents = read_safetensors(path)
    assert contents is not None, path
    theirs = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        assert contents.metadata == (handle.metadata() or {})
    assert list(contents.tensors) == list(theirs)  # file order, which the merge's output follows
    for key, tensor in theirs.items():
        ours = contents.tensors[key]
        assert (ours.dtype, ours.shape) == (tensor.dtype, tensor.shape), key
        assert torch.equal(ours, tensor), key


@pytest.mark.parametrize("path", VENDORED, ids=[str(p.relative_to(REPO / "tests" / "data")) for p in VENDORED])
def test_vendored_files_read_as_safetensors_reads_them(path):
    assert_same_as_safetensors(path)


def test_every_dtype_and_odd_shapes(tmp_path):
    values = {f"t{index:02d}": torch.arange(6).reshape(2, 3).to(dtype) for index, dtype in enumerate(SAFETENSORS_DTYPES)}
    values |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "conv": torch.randn(4, 3, 3, 3).half()}
    path = tmp_path / "all.safetensors"
    save_file(values, str(path), metadata={"ss_network_dim": "8", "note": "コピー機"})
    assert_same_as_safetensors(path)


def test_float_runs_cover_every_float_value_once(tmp_path):
    values = {"a": torch.randn(5).half(), "b": torch.randn(3, 2).half(), "c": torch.randn(4), "i": torch.arange(3)}
    path = tmp_path / "mixed.safetensors"
    save_file(values, str(path))
    runs = read_safetensors(path).float_runs
    assert sorted((str(run.dtype), run.numel()) for run in runs) == [("torch.float16", 11), ("torch.float32", 4)]


def test_writing_to_a_tensor_does_not_touch_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4)}, str(path))
    before = path.read_bytes()
    read_safetensors(path).tensors["x"].fill_(1.0)
    assert path.read_bytes() == before


def rewritten_header(path: Path, change) -> None:
    """The file with its header passed through change(header) and the data section kept."""
    raw = path.read_bytes()
    end = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:end])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[end:])


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h["b"].update(dtype="F4"),  # a dtype outside the table
        lambda h: h["b"].update(data_offsets=[h["b"]["data_offsets"][0] + 2, h["b"]["data_offsets"][1] + 2]),
        lambda h: h["b"].update(shape=[3]),  # size disagrees with the offsets
        lambda h: h.update(extra={"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}),  # overlap
        lambda h: h.update(__metadata__={"n": 1}),  # metadata values must be strings
        lambda h: h.update(__metadata__=0),  # a falsy non-map was taken for "no metadata" (found by hypothesis)
    ],
    ids=["unknown-dtype", "gap", "wrong-size", "overlap", "non-string-metadata", "metadata-zero"],
)
def test_a_file_it_cannot_vouch_for_goes_to_safetensors(tmp_path, change):
    path = tmp_path / "odd.safetensors"
    save_file({"a": torch.ones(2).half(), "b": torch.ones(2)}, str(path))
    rewritten_header(path, change)
    assert read_safetensors(path) is None


def test_a_bad_file_is_still_named_by_read_lora(tmp_path):
    """Where this reader declines, safetensors reads the file and its complaint names the file."""
    path = tmp_path / "bad.safetensors"
    save_file({"m.lora_down.weight": torch.ones(2, 4), "m.lora_up.weight": torch.ones(4, 2)}, str(path))
    rewritten_header(path, lambda h: h["m.lora_up.weight"].update(dtype="F4"))
    with pytest.raises(Exception, match="bad.safetensors: not a valid safetensors file"):
        read_lora(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x00", b"\xff" * 8 + b"{}"], ids=["empty", "short", "huge-header"])
def test_truncated_files_go_to_safetensors(tmp_path, content):
    path = tmp_path / "t.safetensors"
    path.write_bytes(content)
    assert read_safetensors(path) is None


def test_a_header_over_safetensors_limit_is_left_to_safetensors_unread(tmp_path):
    """Valid JSON padded past safetensors' 100 MB header limit used to be accepted here."""
    path = tmp_path / "padded.safetensors"
    text = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    text += b" " * (MAX_HEADER_BYTES + 8 - len(text))
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 4)
    assert read_safetensors(path) is None
    with pytest.raises(CopyloraError, match="padded.safetensors: not a valid safetensors file .*header too large"):
        read_lora(path)


def test_a_2_gib_header_is_refused_without_reading_it(tmp_path, monkeypatch):
    """A sparse file declaring a 2 GiB header of zeros: refused from its first 8 bytes (it was
    read whole and parsed first, 10.9 s and 6.5 GB)."""
    path = tmp_path / "zeros.safetensors"
    with open(path, "wb") as f:
        f.write((2**31).to_bytes(8, "little"))
        f.truncate(8 + 2**31)

    class NoParsing:
        def loads(self, *args, **kwargs):
            raise AssertionError("the header was read and parsed")

    with monkeypatch.context() as m:
        m.setattr("copylora.formats.safetensors_reader.json", NoParsing())
        assert read_safetensors(path) is None
    with pytest.raises(CopyloraError, match="zeros.safetensors: not a valid safetensors file .*header too large"):
        read_lora(path)


def test_a_file_truncated_after_reading_does_not_kill_the_reader(tmp_path):
    """A trainer rewriting an input while the merge runs: the tensors were read, not mapped (a
    mapping's pages past the new end raise SIGBUS). In a child process, so a crash is a failure."""
    path = tmp_path / "rewritten.safetensors"
    save_file({"m.lora_down.weight": torch.ones(64, 4096), "m.lora_up.weight": torch.ones(4096, 64)}, str(path))
    code = (
        "import os, sys\n"
        "from copylora.formats.safetensors_reader import read_safetensors\n"
        "contents = read_safetensors(sys.argv[1])\n"
        "os.truncate(sys.argv[1], 64)\n"
        "print(sum(float(t.sum()) for t in contents.tensors.values()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert float(proc.stdout) == 2 * 64 * 4096
