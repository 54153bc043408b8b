"""Block mapping of module names and LBW vectors (the sd-webui-lora-block-weight convention)."""

import pytest

from copylora.errors import CopyloraError
from copylora.formats.naming import BLOCK_NAMES, block_group, block_index, parse_lbws


@pytest.mark.parametrize(
    ("name", "sdxl", "block"),
    [
        ("lora_te_text_model_encoder_layers_3_mlp_fc1", False, "BASE"),
        ("lora_te2_text_model_encoder_layers_30_mlp_fc1", True, "BASE"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", False, "IN01"),
        ("lora_unet_down_blocks_0_attentions_1_proj_in", False, "IN02"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", False, "IN03"),
        ("lora_unet_down_blocks_1_resnets_0_conv1", False, "IN04"),
        ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", False, "IN08"),
        ("lora_unet_mid_block_attentions_0_proj_out", False, "MID"),
        ("lora_unet_up_blocks_0_resnets_2_conv2", False, "OUT02"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", False, "OUT02"),
        ("lora_unet_up_blocks_1_attentions_0_proj_in", False, "OUT03"),
        ("lora_unet_up_blocks_3_attentions_2_proj_out", False, "OUT11"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", True, "IN04"),
        ("lora_unet_input_blocks_8_1_proj_in", True, "IN08"),
        ("lora_unet_middle_block_1_proj_in", True, "MID"),
        ("lora_unet_output_blocks_0_1_proj_out", True, "OUT00"),
        ("lora_unet_output_blocks_5_1_proj_out", True, "OUT05"),
    ],
)
def test_block_index(name, sdxl, block):
    assert BLOCK_NAMES[block_index(name, sdxl)] == block


def test_names_outside_any_block():
    assert block_index("lora_unet_conv_in", False) is None
    assert block_index("lora_unet_down_blocks_0_attentions_0_proj_in", True) is None  # SD1.5 name, SDXL vector


def test_lbw_17_addresses_its_blocks_only():
    vector = [float(i) for i in range(17)]  # BASE=0, IN01=1, IN02=2, IN04=3, ...
    (weights,) = parse_lbws([str(vector)])
    assert not weights.sdxl_layout
    assert weights.for_module("lora_te_text_model_encoder_layers_0_mlp_fc1") == 0.0
    assert weights.for_module("lora_unet_down_blocks_0_attentions_1_proj_in") == 2.0  # IN02
    assert weights.for_module("lora_unet_down_blocks_1_attentions_0_proj_in") == 3.0  # IN04
    assert weights.for_module("lora_unet_mid_block_attentions_0_proj_in") == 7.0
    assert weights.for_module("lora_unet_up_blocks_1_attentions_0_proj_in") == 8.0  # OUT03
    assert weights.for_module("lora_unet_up_blocks_0_resnets_0_conv1") == 1.0  # OUT00: not in the 17 preset


def test_lbw_12_is_sdxl_layout():
    (weights,) = parse_lbws(["[" + ",".join(["0.5"] * 12) + "]"])
    assert weights.sdxl_layout
    assert weights.for_module("lora_unet_input_blocks_4_1_proj_in") == 0.5
    assert weights.for_module("lora_unet_input_blocks_1_0_in_layers_2") == 1.0  # IN01 not addressed by 12


@pytest.mark.parametrize("bad", ["[1,2", "{\"a\": 1}", "[true,1,1,1,1,1,1,1,1,1,1,1]", "[1,1,1]"])
def test_bad_lbws(bad):
    with pytest.raises(CopyloraError, match="--lbws"):
        parse_lbws([bad])


def test_lbws_lengths_must_agree():
    with pytest.raises(CopyloraError, match="same length"):
        parse_lbws(["[" + ",".join(["1"] * 12) + "]", "[" + ",".join(["1"] * 17) + "]"])


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "te"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "te1"),
        ("lora_unet_down_blocks_2_attentions_0_proj_in", "down_2"),
        ("lora_unet_mid_block_attentions_0_proj_in", "mid"),
        ("lora_unet_input_blocks_7_1_proj_in", "in_07"),
        ("lora_unet_middle_block_1_proj_in", "mid"),
    ],
)
def test_block_group(name, group):
    assert block_group(name) == group
