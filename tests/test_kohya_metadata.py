"""Our metadata definitions reproduce what stock wrote into the real reference files."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from copylora.kohya_metadata import BaseModelInfo, modelspec_metadata, network_metadata, weight_hashes
from tests.conftest import GOLDEN, golden_cases
from tests.lora_compare import read_metadata

STOCK_FILES = sorted({folder / case["ref"] for folder, case in golden_cases()})
# sdxl_subset's inputs were cut from larger files and keep those files' hashes, so only the
# uncut inputs can be checked.
INPUT_FILES = sorted(p for p in GOLDEN.glob("*/[AB].safetensors") if p.parent.name != "sdxl_subset")


@pytest.mark.parametrize("path", STOCK_FILES + INPUT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_hashes_reproduce_stock(path):
    """sshs_* recomputed from the file's own tensors and ss_* metadata equal the stored ones."""
    metadata = read_metadata(path)
    hashes = weight_hashes(load_file(str(path)), metadata)
    assert hashes["sshs_model_hash"] == metadata["sshs_model_hash"]
    assert hashes["sshs_legacy_hash"] == metadata["sshs_legacy_hash"]


@pytest.mark.parametrize("path", STOCK_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_network_and_modelspec_keys_reproduce_stock(path):
    stock = read_metadata(path)
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
