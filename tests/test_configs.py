"""The presets and copylora's config checks, against kohya's real parser dumps (tests/data/kohya)."""

from __future__ import annotations

import json
import sys
import tomllib

import pytest

from copylora.errors import CopyloraError
from copylora.kohya.options import (
    LIMIT_KEYS,
    OWNED_KEYS,
    PRESETS_DIR,
    KohyaOptions,
    build_config,
    dumps_toml,
    load_preset,
    parse_set,
    preset_path,
)
from tests.test_train_fakes import DUMPS, make_sd_scripts

PRESETS = {"copy_machine_sd15": "train_network.py", "copy_machine_sdxl": "sdxl_train_network.py"}
OWNED = {"pretrained_model_name_or_path": "/m/base.safetensors", "train_data_dir": "/o/A_dataset",
         "output_dir": "/o", "output_name": "A"}


@pytest.fixture(scope="module")
def options() -> dict[str, KohyaOptions]:
    return {script: KohyaOptions.from_json(path) for script, path in DUMPS.items()}


def test_shipped_presets_are_the_two_documented_ones():
    assert sorted(p.stem for p in PRESETS_DIR.glob("*.toml")) == sorted(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_key_is_an_option_of_its_script_with_a_valid_value(name, options):
    preset = load_preset(preset_path(name, sdxl=False), sdxl=False)
    assert preset.script == PRESETS[name]
    opts = options[preset.script]
    for key, value in preset.keys.items():
        assert key in opts.options, key
        checked = opts.check(key, value, name)
        assert checked == value, (key, value, checked)  # already of the option's type


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("cuda", [False, True])
def test_every_key_the_adapter_emits_is_an_option(name, cuda, options):
    preset = load_preset(preset_path(name, sdxl=False), sdxl=False)
    opts = options[preset.script]
    final = build_config(preset, ["max_train_steps=4", "network_args=conv_dim=4"], opts, OWNED, cuda)
    assert set(final.keys) <= set(opts.options)
    assert set(OWNED_KEYS) | set(LIMIT_KEYS) <= set(opts.options)  # the keys copylora reasons about exist
    for key, value in final.keys.items():
        assert opts.check(key, value, "final") == value


@pytest.mark.parametrize("name", PRESETS)
def test_recipe_values(name):
    keys = load_preset(preset_path(name, sdxl=False), sdxl=False).keys
    assert keys["network_module"] == "networks.lora"
    assert (keys["network_dim"], keys["network_alpha"]) == (8, 1)
    assert (keys["optimizer_type"], keys["learning_rate"], keys["lr_scheduler"]) == ("AdamW8bit", 1e-4, "constant")
    assert keys["max_train_epochs"] == 800 and "max_train_steps" not in keys
    assert (keys["save_model_as"], keys["save_precision"], keys["mixed_precision"]) == ("safetensors", "fp16", "fp16")
    assert isinstance(keys["seed"], int)
    assert not {"class_tokens", "caption_extension", "caption_prefix", "caption_suffix"} & set(keys)


def test_sd15_and_sdxl_specifics():
    sd15 = load_preset(preset_path(None, sdxl=False), sdxl=False)
    sdxl = load_preset(preset_path(None, sdxl=True), sdxl=True)
    assert (sd15.num_repeats, sd15.keys["resolution"]) == (5, "600,900")
    assert sdxl.num_repeats == 5 and sdxl.script == "sdxl_train_network.py"
    width, height = map(int, sdxl.keys["resolution"].split(","))
    assert 0.9e6 < width * height < 1.2e6 and width % 64 == height % 64 == 0
    assert sdxl.keys["no_half_vae"] is True
    assert 5 * sd15.keys["max_train_epochs"] == 4000  # 1 image x 5 repeats x 800 epochs


def test_preset_by_file_and_unknown_name(tmp_path):
    custom = tmp_path / "mine.toml"
    custom.write_text("max_train_steps = 10\n[copylora]\nnum_repeats = 2\n")
    preset = load_preset(preset_path(str(custom), sdxl=False), sdxl=False)
    assert (preset.num_repeats, preset.keys, preset.script) == (2, {"max_train_steps": 10}, "train_network.py")
    with pytest.raises(CopyloraError, match="no such preset.*copy_machine_sd15"):
        preset_path("copy_machine_sd3", sdxl=False)


@pytest.mark.parametrize("text, problem", [
    ("[a]\nx = 1\n[b]\nx = 2\n", "x is set twice"),
    ("[a.b]\nx = 1\n", "nested"),
    ("[copylora]\nrepeats = 5\n", "repeats is not a copylora key"),
    ("[copylora]\nnum_repeats = 0\n", "num_repeats must be"),
    ("[copylora]\nscript = \"train_db.py\"\n", "script must be one of"),
    ("x = \n", "not valid TOML"),
])
def test_bad_presets_name_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(CopyloraError, match=problem) as info:
        load_preset(path, sdxl=False)
    assert str(path) in str(info.value)


def test_sdxl_flag_refuses_an_sd15_preset():
    with pytest.raises(CopyloraError, match="--sdxl"):
        load_preset(preset_path("copy_machine_sd15", sdxl=True), sdxl=True)


@pytest.mark.parametrize("text, expected", [
    ("learning_rate=2e-4", ("learning_rate", 2e-4)),
    ("resolution=600,900", ("resolution", "600,900")),
    ("resolution=64", ("resolution", 64)),
    ("optimizer_type=AdamW", ("optimizer_type", "AdamW")),
    ("sdpa=false", ("sdpa", False)),
    ('network_args=["conv_dim=4", "conv_alpha=1"]', ("network_args", ["conv_dim=4", "conv_alpha=1"])),
    ("max_train_epochs=", ("max_train_epochs", None)),
    ("output_name= a=b ", ("output_name", "a=b")),
])
def test_parse_set(text, expected):
    assert parse_set(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", "two words=1"])
def test_parse_set_refuses_malformed(text):
    with pytest.raises(CopyloraError, match="KEY=VALUE"):
        parse_set(text)


def test_check_converts_to_the_option_type_and_checks_choices(options):
    opts = options["train_network.py"]
    assert opts.check("resolution", 64, "x") == "64"  # kohya splits this text itself
    assert opts.check("network_alpha", 1, "x") == 1.0 and isinstance(opts.check("network_alpha", 1, "x"), float)
    assert opts.check("max_train_steps", 4.0, "x") == 4 and opts.check("max_train_steps", "4", "x") == 4
    assert opts.check("network_args", "conv_dim=4", "x") == ["conv_dim=4"]
    with pytest.raises(CopyloraError, match="integer"):
        opts.check("max_train_steps", 4.5, "x")
    with pytest.raises(CopyloraError, match="number"):
        opts.check("learning_rate", "fast", "x")
    with pytest.raises(CopyloraError, match="switch"):
        opts.check("sdpa", "yes", "x")
    with pytest.raises(CopyloraError, match="one of no, fp16, bf16"):
        opts.check("mixed_precision", "fp8", "x")
    with pytest.raises(CopyloraError, match="one value"):
        opts.check("seed", [1, 2], "x")


def test_unknown_key_names_origin_and_closest_option(options):
    with pytest.raises(CopyloraError) as info:
        options["train_network.py"].check("max_train_step", 4, "my.toml")
    message = str(info.value)
    assert message.startswith("my.toml: max_train_step is not an option of train_network.py")
    assert "did you mean max_train_steps?" in message
    with pytest.raises(CopyloraError, match="not an option of train_network.py") as info:
        options["train_network.py"].check("cache_text_encoder_outputs", True, "x")  # SDXL's
    assert "sdxl" not in str(info.value)


def _preset(tmp_path, text: str):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return load_preset(path, sdxl=False)


def test_set_overrides_and_removes(tmp_path, options):
    preset = _preset(tmp_path, "max_train_epochs = 800\nlearning_rate = 1e-4\nseed = 1\n")
    final = build_config(preset, ["learning_rate=3e-4", "seed=", "max_train_steps=4"],
                         options["train_network.py"], OWNED, cuda=True)
    assert final.keys["learning_rate"] == 3e-4 and "seed" not in final.keys
    assert final.keys["max_train_steps"] == 4 and "max_train_epochs" not in final.keys
    assert any("max_train_epochs = 800" in w and "dropped" in w for w in final.warnings)
    assert {k: final.keys[k] for k in OWNED} == OWNED


def test_no_limit_trap(tmp_path, options):
    preset = _preset(tmp_path, "max_train_epochs = 800\n")
    with pytest.raises(CopyloraError, match="neither max_train_steps nor max_train_epochs.*1600"):
        build_config(preset, ["max_train_epochs="], options["train_network.py"], OWNED, cuda=True)


def test_both_limits_refused(tmp_path, options):
    preset = _preset(tmp_path, "max_train_epochs = 800\nmax_train_steps = 10\n")
    with pytest.raises(CopyloraError, match="would use max_train_epochs"):
        build_config(preset, [], options["train_network.py"], OWNED, cuda=True)


@pytest.mark.parametrize("cuda, asked, expected, warned", [
    (False, None, "no", True),
    (False, "bf16", "bf16", False),
    (True, None, "fp16", False),
])
def test_cpu_fp16_trap(tmp_path, options, cuda, asked, expected, warned):
    preset = _preset(tmp_path, 'max_train_steps = 4\nmixed_precision = "fp16"\n')
    sets = [f"mixed_precision={asked}"] if asked else []
    final = build_config(preset, sets, options["train_network.py"], OWNED, cuda)
    assert final.keys["mixed_precision"] == expected
    assert any("no CUDA" in w for w in final.warnings) == warned


@pytest.mark.parametrize("key", sorted(OWNED_KEYS))
def test_keys_copylora_owns_are_refused(tmp_path, options, key):
    preset = _preset(tmp_path, "max_train_steps = 4\n")
    with pytest.raises(CopyloraError, match=f"{key} is set by"):
        build_config(preset, [f"{key}=x"], options["train_network.py"], OWNED, cuda=True)


def test_save_model_as_must_be_safetensors(tmp_path, options):
    preset = _preset(tmp_path, 'max_train_steps = 4\nsave_model_as = "ckpt"\n')
    with pytest.raises(CopyloraError, match="save_model_as must be safetensors"):
        build_config(preset, [], options["train_network.py"], OWNED, cuda=True)


def test_toml_round_trip():
    keys = {"text": 'quote " back\\slash \u00e9 tab\t', "path": r"C:\models\sd15.safetensors", "small": 1e-05,
            "big": 1e300, "whole": 3, "negative": -2.5, "on": True, "off": False, "list": ["a=1", "b"],
            "numbers": [1, 2.5], "empty": [], "odd key": 1}
    text = dumps_toml(keys, ["a comment"])
    assert text.startswith("# a comment\n")
    assert tomllib.loads(text) == keys


def test_final_toml_reads_back_as_the_config(options):
    preset = load_preset(preset_path(None, sdxl=False), sdxl=False)
    final = build_config(preset, [], options["train_network.py"], OWNED, cuda=True)
    assert tomllib.loads(dumps_toml(final.keys)) == final.keys


def test_probe_asks_the_scripts_own_parser(tmp_path):
    sd_scripts = make_sd_scripts(tmp_path / "sd-scripts")
    for script, dump in DUMPS.items():
        probed = KohyaOptions.probe(sys.executable, sd_scripts, script)
        expected = KohyaOptions.from_json(dump)
        assert probed.script == script and isinstance(probed.cuda, bool)
        assert set(probed.options) == set(expected.options)
        assert probed.options["mixed_precision"].choices == ("no", "fp16", "bf16")
        assert probed.options["network_dim"].type == "int"
        assert probed.options["sdpa"].is_flag and probed.options["network_args"].is_list


def test_probe_failure_is_one_clear_line(tmp_path):
    sd_scripts = make_sd_scripts(tmp_path / "sd-scripts")
    (sd_scripts / "train_network.py").write_text("import kohya_dependency_that_is_missing\n")
    with pytest.raises(CopyloraError) as info:
        KohyaOptions.probe(sys.executable, sd_scripts, "train_network.py")
    message = str(info.value)
    assert "could not read its options" in message and "kohya_dependency_that_is_missing" in message
    assert "--kohya-args" in message and "\n" not in message


def test_dump_that_is_not_a_dump(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"script": "train_network.py"}))
    with pytest.raises(CopyloraError, match="not a kohya parser dump"):
        KohyaOptions.from_json(path)
