"""tests/data is what tests/data/slice_shared.py makes from ../shared, and a missing ../shared is
reported, never silently passed over."""

from __future__ import annotations

import hashlib
import json

import pytest
from safetensors.torch import load_file

from tests import conftest
from tests.conftest import DATA, REQUIRE_SHARED, SHARED, golden_params, require_shared
from tests.data import slice_shared
from tests.lora_compare import read_metadata

SOURCES = json.loads((DATA / "sources.json").read_text())


@pytest.mark.parametrize("name", sorted(SOURCES["files"]))
def test_vendored_file_is_the_recorded_one(name):
    assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == SOURCES["files"][name]["sha256"], (
        f"tests/data/{name} was changed by hand: regenerate it (tests/data/README.md)")


@pytest.mark.needs_shared("")
def test_regenerating_from_shared_gives_the_same_bytes(tmp_path):
    """The slicer is deterministic, the vendored files are up to date with ../shared."""
    record = slice_shared.build(SHARED, tmp_path)
    assert record == SOURCES
    for name in record["files"]:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_a_cut_keeps_the_kept_modules_bytes_and_all_metadata(tmp_path):
    whole = DATA / "golden" / "sdxl_subset" / "A.safetensors"
    tensors = load_file(str(whole))
    names = sorted({key.split(".")[0] for key in tensors})
    keep = [names[0], names[7], names[-1]]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(slice_shared.slice_safetensors(whole.read_bytes(), keep))

    cut_tensors = load_file(str(cut))
    assert cut_tensors.keys() == {key for key in tensors if key.split(".")[0] in keep}
    for key, tensor in cut_tensors.items():
        assert tensor.dtype == tensors[key].dtype and tensor.equal(tensors[key]), key
    assert read_metadata(cut) == read_metadata(whole)
    with pytest.raises(SystemExit, match="last module"):
        slice_shared.slice_safetensors(whole.read_bytes(), keep[:2])


def test_missing_shared_skips_with_a_reason(monkeypatch):
    monkeypatch.delenv(REQUIRE_SHARED, raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs the full reference data .*no-such-folder"):
        require_shared("no-such-folder")


def test_missing_shared_fails_when_required(monkeypatch):
    monkeypatch.setenv(REQUIRE_SHARED, "1")
    with pytest.raises(pytest.fail.Exception, match=f"{REQUIRE_SHARED}=1 requires it"):
        require_shared("no-such-folder")


def test_golden_params_never_collect_nothing(tmp_path, monkeypatch):
    """No ../shared: one parameter stands for its cases (and skips or fails); no match at all: an error."""
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "absent")
    [placeholder] = golden_params("golden", where=lambda item: False)
    assert placeholder.id == "shared:golden" and placeholder.marks[0].args == ("golden",)
    (tmp_path / "golden").mkdir()
    monkeypatch.setattr(conftest, "SHARED", tmp_path)
    with pytest.raises(ValueError, match="must not collect nothing"):
        golden_params("golden", where=lambda item: False)
