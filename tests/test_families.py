"""Model families: kohya's DiT-family LoRAs merge with their own metadata, two families are refused,
--lbws is refused outside the SD U-Nets, PEFT inputs keep their names, and the name rules (family,
conv kernel, inspect's blocks) hold for every module of the vendored manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from copylora.formats import families
from copylora.formats.naming import block_group, conv_kernel
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.inspect import main as inspect_main
from copylora.merge import main as merge_main
from copylora.resize import main as resize_main
from tests.conftest import kohya_file

MANIFESTS = {"sd15": "SD 1.x/2.x", "sd15_conv": "SD 1.x/2.x", "sdxl": "SDXL", "sdxl_conv": "SDXL", "flux1": "FLUX.1",
             "sd3": "SD3", "lumina": "Lumina", "hunyuan_image": "HunyuanImage", "anima": "Anima"}

# what kohya's flux_train_network.py writes (ss_base_model_version from flux_utils, modelspec from sai_model_spec)
FLUX_METADATA = {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1", "ss_v2": "False",
                 "modelspec.architecture": "flux-1-dev/lora",
                 "modelspec.implementation": "https://github.com/black-forest-labs/flux",
                 "modelspec.resolution": "1024x1024", "ss_network_dim": "8"}
SDXL_METADATA = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}


def manifest_modules(variant: str) -> list[dict]:
    return json.loads(kohya_file(f"manifests/{variant}.json").read_text())["modules"]


def shapes(variant: str, count: int) -> list[ModuleShape]:
    """The first `count` DiT modules of a manifest, at their real shapes."""
    picked = [m for m in manifest_modules(variant) if m["name"].startswith("lora_unet_")][:count]
    return [ModuleShape(m["name"], m["up"][0], m["down"][1], tuple(m["down"][2:]) or None) for m in picked]


def write(path: Path, modules: list[ModuleShape], metadata: dict[str, str], seed: int, rank: int = 4) -> Path:
    save_file(random_lora(modules, rank, 1.0, seed), str(path), metadata)
    return path


def merge(*args: str) -> int:
    return merge_main([*args, "--backend", "torch", "--quiet"])


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


# ---------------------------------------------------------------- name rules against kohya's own module lists


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_name_rules_hold_for_every_manifest_module(variant):
    modules = manifest_modules(variant)
    names = [m["name"] for m in modules]
    assert families.from_names(names).name == MANIFESTS[variant]
    for family in families.FAMILIES:  # no other family's pattern matches any of these names
        if family.name != MANIFESTS[variant]:
            assert not any(family.names.match(n) for n in names), family.name
    for module in modules:  # the conv kernel LoHa/LoKr files do not store, from the name
        kernel = tuple(module["down"][2:]) if len(module["down"]) == 4 else None
        assert conv_kernel(module["name"], v2=False) == kernel, module["name"]
    assert "other" not in {block_group(n) for n in names}


def test_inspect_blocks_of_a_flux_lora():
    assert block_group("lora_unet_double_blocks_7_img_attn_qkv") == "double_07"
    assert block_group("lora_unet_single_blocks_37_linear2") == "single_37"
    assert block_group("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == "te3"


# ---------------------------------------------------------------- merge


def test_inspect_groups_a_flux_lora_by_block(tmp_path, capsys):
    modules = shapes("flux1", 3) + [s for s in shapes("flux1", 300) if s.name.startswith("lora_unet_single_blocks_2_")]
    path = write(tmp_path / "flux.safetensors", modules, FLUX_METADATA, 0)
    assert inspect_main([str(path)]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["double_00"] == "3" and rows["single_02"] == "3" and "other" not in rows


def test_flux_pair_merge_carries_the_family_metadata(tmp_path):
    modules = shapes("flux1", 6)
    a = write(tmp_path / "A.safetensors", modules, FLUX_METADATA, 0)
    b = write(tmp_path / "B.safetensors", modules, FLUX_METADATA, 1)
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(b), str(a), "--ratios", "1", "-1", "--new_rank", "8", "--save_to", str(out)) == 0
    metadata = metadata_of(out)
    for key in ("ss_network_module", "ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                "modelspec.resolution"):
        assert metadata[key] == FLUX_METADATA[key], key

    bare = tmp_path / "bare.safetensors"
    assert merge("--models", str(b), str(a), "--ratios", "1", "-1", "--save_to", str(bare), "--no_metadata") == 0
    metadata = metadata_of(bare)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_base_model_version"] == "flux1"
    assert not any(k.startswith("modelspec.") for k in metadata)


def test_family_keys_the_inputs_disagree_on_are_left_out(tmp_path):
    """An SD value would be wrong for FLUX; a key the inputs disagree on or lack is not written."""
    modules = shapes("flux1", 3)
    other = {**FLUX_METADATA, "modelspec.resolution": "512x512", "modelspec.architecture": "flux-1-schnell"}
    del other["modelspec.implementation"]
    a = write(tmp_path / "A.safetensors", modules, FLUX_METADATA, 0)
    b = write(tmp_path / "B.safetensors", modules, other, 1)
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(a), str(b), "--ratios", "1", "1", "--save_to", str(out)) == 0
    metadata = metadata_of(out)
    assert "modelspec.resolution" not in metadata and "modelspec.architecture" not in metadata
    assert metadata["modelspec.implementation"] == FLUX_METADATA["modelspec.implementation"]  # the one that says
    assert metadata["ss_network_module"] == "networks.lora_flux"


@pytest.mark.parametrize("by", ["metadata", "names"])
def test_two_families_are_refused_naming_both(tmp_path, capsys, by):
    flux = write(tmp_path / "flux.safetensors", shapes("flux1", 3), FLUX_METADATA if by == "metadata" else {}, 0)
    sdxl = write(tmp_path / "sdxl.safetensors", shapes("sdxl", 3), SDXL_METADATA if by == "metadata" else {}, 1)
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(flux), str(sdxl), "--ratios", "1", "1", "--save_to", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FLUX.1" in err and "SDXL" in err, err
    assert "flux.safetensors" in err and "sdxl.safetensors" in err and not out.exists()


def test_a_file_mixing_families_is_refused(tmp_path, capsys):
    mixed = write(tmp_path / "mixed.safetensors", shapes("flux1", 2) + shapes("sdxl", 2), {}, 0)
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(mixed), "--ratios", "1", "--save_to", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mixed.safetensors: mixes module names of SDXL and FLUX.1" in err, err
    assert not out.exists()


def test_lbws_are_refused_for_a_dit_family(tmp_path, capsys):
    a = write(tmp_path / "A.safetensors", shapes("sd3", 3), {"ss_base_model_version": "sd3"}, 0)
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(a), "--ratios", "1", "--lbws", str([1.0] * 17), "--save_to", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SD U-Nets only" in err and "SD3" in err and not out.exists()


def test_peft_inputs_merge_and_keep_their_names(tmp_path):
    """ai-toolkit / diffusers FLUX LoRAs: transformer.<module>.lora_A/lora_B.weight, no alpha."""
    names = ["transformer.single_transformer_blocks.0.attn.to_k", "transformer.transformer_blocks.3.ff.net.2"]
    sizes = [(3072, 3072), (3072, 12288)]
    files = []
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, (out, inp) in zip(names, sizes):
            tensors[f"{name}.lora_A.weight"] = torch.randn(4, inp, generator=gen).to(torch.float16) * 0.05
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, 4, generator=gen).to(torch.float16) * 0.05
        files.append(tensors)
        save_file(tensors, str(tmp_path / f"p{seed}.safetensors"), {"format": "pt"})
    out = tmp_path / "out.safetensors"
    assert merge("--models", str(tmp_path / "p1.safetensors"), str(tmp_path / "p0.safetensors"), "--ratios", "1", "-1",
                 "--new_rank", "8", "--clamp_quantile", "1", "--save_to", str(out)) == 0
    saved = load_file(str(out))
    assert set(saved) == {f"{n}.{k}" for n in names for k in ("lora_A.weight", "lora_B.weight", "alpha")}
    metadata = metadata_of(out)  # FLUX.1 by its diffusers names: not labelled SD1.5, nothing it does not know
    assert metadata["ss_network_module"] == "networks.lora_flux" and "modelspec.architecture" not in metadata
    for name in names:
        expected = sum(sign * f[f"{name}.lora_B.weight"].float() @ f[f"{name}.lora_A.weight"].float()
                       for sign, f in ((1, files[1]), (-1, files[0])))
        got = saved[f"{name}.lora_B.weight"].float() @ saved[f"{name}.lora_A.weight"].float()
        assert float((got - expected).norm() / expected.norm()) < 1e-5, name


def test_a_flux_loha_converts_to_a_flux_lora(tmp_path):
    """resize keeps the input's metadata (as stock); a converted LoHa names the family's LoRA module."""
    name, out_features, in_features = "lora_unet_double_blocks_0_img_attn_proj", 3072, 3072
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{name}.hada_w1_a": torch.randn(out_features, 4, generator=gen),
               f"{name}.hada_w1_b": torch.randn(4, in_features, generator=gen),
               f"{name}.hada_w2_a": torch.randn(out_features, 4, generator=gen),
               f"{name}.hada_w2_b": torch.randn(4, in_features, generator=gen), f"{name}.alpha": torch.tensor(2.0)}
    source = tmp_path / "loha.safetensors"
    save_file(tensors, str(source), {**FLUX_METADATA, "ss_network_module": "networks.loha"})
    out = tmp_path / "out.safetensors"
    assert resize_main(["--model", str(source), "--save_to", str(out), "--new_rank", "16", "--quiet"]) == 0
    metadata = metadata_of(out)
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["copylora_converted_from"] == "loha: LoHa (networks.loha)"
    assert metadata["modelspec.architecture"] == FLUX_METADATA["modelspec.architecture"]
