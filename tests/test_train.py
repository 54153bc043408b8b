"""`copylora train` end to end against a stand-in sd-scripts checkout (tests/test_train_fakes.py)."""

from __future__ import annotations

import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from copylora import train
from copylora.kohya.dataset import MARKER
from tests.test_train_fakes import PYTHON, FakeKohya, dump_with_cuda, read_log


class Kohya(FakeKohya):
    """The stand-in kohya, plus parser dumps and images for `copylora train`."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(tmp_path, monkeypatch)
        self.out = tmp_path / "out"

    def dump(self, cuda: bool = False, script: str = "train_network.py") -> Path:
        return dump_with_cuda(script, cuda, self.root / f"{script}.{cuda}.json")

    def image(self, name: str, color=(200, 30, 30), size=(24, 36), folder: str = "images") -> Path:
        path = self.root / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(path)
        return path

    def args(self, images: Path, *extra: str, cuda: bool = False, sdxl: bool = False, probe: bool = False) -> list[str]:
        args = ["--sd-scripts", str(self.sd_scripts), "--base", str(self.base), "--images", str(images),
                "--output-dir", str(self.out), "--name", "A", "--python", PYTHON]
        if not probe:
            script = "sdxl_train_network.py" if sdxl else "train_network.py"
            args += ["--kohya-args", str(self.dump(cuda, script))]
        return args + (["--sdxl"] if sdxl else []) + list(extra)

    def runs(self) -> list[dict]:
        return read_log(self.log)


@pytest.fixture
def kohya(tmp_path, monkeypatch) -> Kohya:
    return Kohya(tmp_path, monkeypatch)


def printed_toml(out: str) -> dict:
    """The TOML part of --dry-run's output (after the config file's own '# path:' line)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# ") and line.endswith(".toml:"))
    return tomllib.loads("\n".join(lines[start + 1:]))


def test_dry_run_sd15(kohya, capsys):
    image = kohya.image("before.png")
    assert train.main(kohya.args(image, "--dry-run")) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if not line.startswith("#") and "accelerate" in line)
    assert shlex.split(command) == [PYTHON, "-m", "accelerate.commands.launch", "train_network.py",
                                    "--config_file", str(kohya.out / "A.toml")]
    assert f"run in {kohya.sd_scripts}" in out
    config = printed_toml(out)
    assert config["network_module"] == "networks.lora" and config["network_dim"] == 8
    assert config["resolution"] == "600,900" and config["max_train_epochs"] == 800
    assert config["optimizer_type"] == "AdamW8bit" and config["learning_rate"] == 1e-4
    assert config["train_data_dir"] == str(kohya.out / "A_dataset")
    assert (config["output_dir"], config["output_name"]) == (str(kohya.out), "A")
    assert config["pretrained_model_name_or_path"] == str(kohya.base.resolve())
    assert f"{kohya.out / 'A_dataset' / '5'}/ (no caption files)" in out
    assert not kohya.out.exists() and kohya.runs() == []  # nothing written, nothing run


def test_dry_run_sdxl(kohya, capsys):
    image = kohya.image("before.png")
    assert train.main(kohya.args(image, "--dry-run", sdxl=True, cuda=True)) == 0
    out = capsys.readouterr().out
    assert " sdxl_train_network.py --config_file " in out
    config = printed_toml(out)
    assert config["resolution"] == "832,1216" and config["no_half_vae"] is True
    assert config["mixed_precision"] == "fp16"  # CUDA: kept
    assert not kohya.out.exists()


def test_dry_run_with_the_probe_instead_of_a_dump(kohya, capsys):
    image = kohya.image("before.png")
    assert train.main(kohya.args(image, "--dry-run", "--set", "no_such_key=1", probe=True)) == 2
    assert "no_such_key is not an option of train_network.py" in capsys.readouterr().err


def test_training_run(kohya, capsys):
    image = kohya.image("before.png")
    (image.parent / "before.txt").write_text("a caption that must not be used")
    assert train.main(kohya.args(image, "--set", "max_train_steps=3", "--accelerate-arg=--num_processes 1")) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == str(kohya.out / "A.safetensors")
    [run] = kohya.runs()
    assert run["script"] == "train_network.py" and run["cwd"] == str(kohya.sd_scripts)
    assert run["argv"] == ["--config_file", str(kohya.out / "A.toml")]
    assert run["accelerate"] == ["--num_processes", "1"]
    assert run["unknown"] == [] and run["config"]["max_train_steps"] == 3
    assert "max_train_epochs" not in run["config"]
    assert run["dataset"] == [MARKER, "5/before.png"]  # folder "5": no caption; no caption files
    written = tomllib.loads((kohya.out / "A.toml").read_text())
    assert written == run["config"]


def test_dataset_from_a_folder_replaces_an_old_layout(kohya):
    first = kohya.image("one.png", folder="set")
    kohya.image("two.jpg", folder="set")
    (first.parent / "notes.md").write_text("not an image")
    assert train.main(kohya.args(first.parent)) == 0
    assert kohya.runs()[-1]["dataset"] == [MARKER, "5/one.png", "5/two.jpg"]
    preset = kohya.root / "p.toml"
    preset.write_text("max_train_steps = 2\nnetwork_dim = 4\nnetwork_alpha = 1\n[copylora]\nnum_repeats = 2\n")
    assert train.main(kohya.args(first, "--preset", str(preset))) == 0
    assert kohya.runs()[-1]["dataset"] == [MARKER, "2/one.png"]


def test_foreign_dataset_folder_is_not_touched(kohya, capsys):
    stranger = kohya.out / "A_dataset" / "keep.txt"
    stranger.parent.mkdir(parents=True)
    stranger.write_text("mine")
    assert train.main(kohya.args(kohya.image("a.png"))) == 2
    assert "not made by copylora" in capsys.readouterr().err and stranger.exists()


def test_unknown_key_is_refused_before_launch(kohya, capsys):
    assert train.main(kohya.args(kohya.image("a.png"), "--set", "learning_rat=1e-4")) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m copylora.train: error: --set learning_rat: learning_rat is not an option")
    assert "did you mean learning_rate?" in err and len(err.strip().splitlines()) == 1
    assert kohya.runs() == []


def test_no_limit_trap(kohya, capsys):
    assert train.main(kohya.args(kohya.image("a.png"), "--set", "max_train_epochs=")) == 2
    assert "1600 steps" in capsys.readouterr().err and kohya.runs() == []


def test_cpu_fp16_trap(kohya, capsys):
    assert train.main(kohya.args(kohya.image("a.png"), "--dry-run", cuda=False)) == 0
    captured = capsys.readouterr()
    assert printed_toml(captured.out)["mixed_precision"] == "no"
    assert "warning: no CUDA here: mixed_precision fp16 replaced by no" in captured.err
    assert train.main(kohya.args(kohya.image("a.png"), "--dry-run", "--set", "mixed_precision=bf16")) == 0
    captured = capsys.readouterr()
    assert printed_toml(captured.out)["mixed_precision"] == "bf16" and "no CUDA" not in captured.err


def test_kohya_failure_propagates(kohya, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_KOHYA_EXIT", "3")
    assert train.main(kohya.args(kohya.image("a.png"))) == 3
    err = capfd.readouterr().err
    assert "fake kohya: failing on purpose" in err  # kohya's own output streams through
    assert "python -m copylora.train: error: kohya's train_network.py exited with code 3" in err


@pytest.mark.parametrize("write, problem", [("nothing", "exited 0 but did not write"), ("not-a-lora", "not a LoRA")])
def test_missing_or_wrong_output_is_an_error(kohya, capsys, monkeypatch, write, problem):
    monkeypatch.setenv("FAKE_KOHYA_WRITE", write)
    assert train.main(kohya.args(kohya.image("a.png"))) == 2
    assert problem in capsys.readouterr().err


def test_a_stale_lora_does_not_count_as_output(kohya, capsys, monkeypatch):
    assert train.main(kohya.args(kohya.image("a.png"))) == 0
    monkeypatch.setenv("FAKE_KOHYA_WRITE", "nothing")
    assert train.main(kohya.args(kohya.image("a.png"))) == 2
    assert "did not write" in capsys.readouterr().err


@pytest.mark.parametrize("break_it, problem", [
    (lambda k: k.base.unlink(), "no such base model"),
    (lambda k: (k.root / "images" / "a.png").write_bytes(b"\x89PNG broken"), "cannot open this image"),
    (lambda k: (k.root / "images" / "a.png").unlink(), "no such image or folder"),
])
def test_inputs_are_checked_before_launch(kohya, capsys, break_it, problem):
    image = kohya.image("a.png")
    break_it(kohya)
    assert train.main(kohya.args(image)) == 2
    assert problem in capsys.readouterr().err and kohya.runs() == []


def test_not_a_checkout(kohya, capsys, tmp_path):
    args = kohya.args(kohya.image("a.png"))
    args[args.index("--sd-scripts") + 1] = str(tmp_path / "images")
    assert train.main(args) == 2
    assert "not an sd-scripts checkout" in capsys.readouterr().err


def test_dump_for_the_wrong_script(kohya, capsys):
    args = kohya.args(kohya.image("a.png"), "--sdxl")
    assert train.main(args) == 2  # the dump is train_network.py's, the preset wants sdxl_train_network.py
    assert "a dump of train_network.py's options" in capsys.readouterr().err


def test_copylora_train_subcommand(kohya):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "copylora", "train", *kohya.args(kohya.image("a.png"), "--dry-run")],
                          capture_output=True, text=True, cwd=Path(train.__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert "accelerate.commands.launch train_network.py" in done.stdout
