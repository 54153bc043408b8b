"""Our metadata definitions reproduce what stock wrote into the real reference files."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from copylora.formats.kohya_metadata import BaseModelInfo, modelspec_metadata, network_metadata, weight_hashes
from tests.conftest import GoldenCase, GoldenFolder, golden_params
from tests.lora_compare import read_metadata

# The sshs_* hashes are whole-file facts: only uncut files (not tests/data's slices) can show them.
# sdxl_subset's inputs were cut from larger files by whoever made them and keep those files'
# hashes, so only the other folders' inputs can be checked.
WHOLE_STOCK = golden_params("golden", where=lambda case: not case.folder.sliced)
WHOLE_INPUTS = golden_params("golden", per="folder", where=lambda f: not f.sliced and f.name != "sdxl_subset")


def assert_hashes_reproduce(path: Path) -> None:
    """sshs_* recomputed from the file's own tensors and ss_* metadata equal the stored ones."""
    metadata = read_metadata(path)
    hashes = weight_hashes(load_file(str(path)), metadata)
    assert hashes["sshs_model_hash"] == metadata["sshs_model_hash"]
    assert hashes["sshs_legacy_hash"] == metadata["sshs_legacy_hash"]


@pytest.mark.parametrize("case", WHOLE_STOCK)
def test_stock_output_hashes_reproduce_stock(case: GoldenCase):
    assert_hashes_reproduce(case.ref)


@pytest.mark.parametrize("input_name", ["A", "B"])
@pytest.mark.parametrize("folder", WHOLE_INPUTS)
def test_input_hashes_reproduce_stock(folder: GoldenFolder, input_name):
    assert_hashes_reproduce(folder.path / f"{input_name}.safetensors")


@pytest.mark.parametrize("case", golden_params("golden"))
def test_network_and_modelspec_keys_reproduce_stock(case: GoldenCase):
    """ss_* and modelspec.* come from metadata alone, so a cut file keeps stock's values."""
    stock = read_metadata(case.ref)
    base = BaseModelInfo(stock.get("ss_v2"), stock.get("ss_base_model_version"))
    args = json.loads(stock["ss_network_args"])
    ours = network_metadata(base, stock["ss_network_dim"], stock["ss_network_alpha"], args)
    assert ours == {k: v for k, v in stock.items() if k.startswith("ss_")}
    spec = modelspec_metadata(base, title=stock["modelspec.title"], merged_from=stock["modelspec.merged_from"].split(", "))
    assert spec.keys() == {k for k in stock if k.startswith("modelspec.")}
    for key in ("architecture", "implementation", "resolution", "prediction_type", "sai_model_spec", "title", "merged_from"):
        assert spec[f"modelspec.{key}"] == stock[f"modelspec.{key}"], key


@pytest.mark.parametrize(
    ("v2", "base", "arch", "impl", "reso", "pred"),
    [
        (None, None, "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
        ("False", "sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512", "epsilon"),
        ("True", "sd_v2", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768", "v"),
        ("False", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
         "https://github.com/Stability-AI/generative-models", "1024x1024", "epsilon"),
    ],
)
def test_modelspec_per_base_model(v2, base, arch, impl, reso, pred):
    spec = modelspec_metadata(BaseModelInfo(v2, base), title="t", merged_from=["b", "a"], timestamp=0)
    assert (spec["modelspec.architecture"], spec["modelspec.implementation"]) == (arch, impl)
    assert (spec["modelspec.resolution"], spec["modelspec.prediction_type"]) == (reso, pred)
    assert spec["modelspec.merged_from"] == "b, a"


def test_base_model_comes_from_first_input_that_says():
    info = BaseModelInfo.from_metadata([{}, {"ss_v2": "False", "ss_base_model_version": "sdxl_base_v1-0"}, {"ss_v2": "True"}])
    assert (info.v2, info.base_model_version, info.is_sdxl) == ("False", "sdxl_base_v1-0", True)


def test_source_date_epoch_makes_the_same_inputs_give_the_same_bytes(tmp_path: Path, monkeypatch, capsys) -> None:
    from copylora import demo

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    files = []
    for name in ("first", "second"):
        assert demo.main(["--out", str(tmp_path / name)]) == 0
        files.append(tmp_path / name / "difference.safetensors")
    assert files[0].read_bytes() == files[1].read_bytes()
    assert read_metadata(files[0])["modelspec.date"] == datetime.datetime.fromtimestamp(1767225600).isoformat()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "tomorrow")
    assert demo.main(["--out", str(tmp_path / "third")]) == 2
    assert "SOURCE_DATE_EPOCH='tomorrow': must be whole seconds since 1970" in capsys.readouterr().err
