"""Finding kohya's Python and passing paths to it the way Windows and Kohya's GUI users have them (issue 9, part 3)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from PIL import Image

from copylora import train
from copylora.kohya.job import default_python, kohya_python
from tests.test_train_fakes import PYTHON, make_accelerate, make_sd_scripts, read_log, write_base_checkpoint


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_windows_venv_in_the_checkout_or_the_gui_folder(tmp_path):
    gui = tmp_path / "Kohya_ss GUI"
    sd_scripts = gui / "sd-scripts"
    sd_scripts.mkdir(parents=True)
    in_gui = touch(gui / "venv" / "Scripts" / "python.exe")
    assert default_python(sd_scripts) == str(in_gui)
    in_checkout = touch(sd_scripts / "venv" / "Scripts" / "python.exe")
    assert default_python(sd_scripts) == str(in_checkout)


def test_python_paths_are_taken_from_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sd_scripts = tmp_path / "elsewhere" / "sd-scripts"
    assert kohya_python("../venv/bin/python", sd_scripts) == str(tmp_path.parent / "venv" / "bin" / "python")
    assert kohya_python("venv\\Scripts\\python.exe", sd_scripts) == os.path.join(tmp_path, "venv\\Scripts\\python.exe")
    assert kohya_python("python3", sd_scripts) == "python3"  # a bare name: looked up on PATH
    assert kohya_python(None, sd_scripts) == default_python(sd_scripts)


def test_relative_python_and_japanese_paths_with_spaces_train(tmp_path, monkeypatch):
    """A Kohya's GUI layout under a Japanese folder name with spaces, kohya's Python given relative to the caller."""
    gui = tmp_path / "Kohya GUI 日本語"
    sd_scripts = make_sd_scripts(gui / "sd-scripts")
    python = gui / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{PYTHON}" "$@"\n', encoding="utf-8")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PYTHONPATH", str(make_accelerate(tmp_path / "fake site")))
    monkeypatch.setenv("FAKE_KOHYA_LOG", str(tmp_path / "kohya.log"))
    for name in ("FAKE_KOHYA_EXIT", "FAKE_KOHYA_WRITE"):
        monkeypatch.delenv(name, raising=False)
    base = write_base_checkpoint(touch(gui / "models" / "ベース モデル.safetensors"))
    caller = gui / "作業" / "今日 の 分"
    image = caller / "元 画像.png"
    image.parent.mkdir(parents=True)
    Image.new("RGB", (24, 36), (200, 30, 30)).save(image)
    monkeypatch.chdir(caller)

    # from sd-scripts/, ../../venv/bin/python would be tmp_path/venv/bin/python, which does not exist
    assert train.main(["--sd-scripts", str(sd_scripts), "--base", str(base), "--images", image.name,
                       "--output-dir", "出力 先", "--name", "A", "--python", "../../venv/bin/python",
                       "--set", "max_train_steps=2"]) == 0  # no --kohya-args: the options are probed with it too
    (run,) = read_log(tmp_path / "kohya.log")
    assert run["config"]["train_data_dir"] == str(caller / "出力 先" / "A_dataset")
    assert run["config"]["pretrained_model_name_or_path"] == str(base)
    assert run["dataset"][-1] == "5/元 画像.png"
    assert (caller / "出力 先" / "A.safetensors").is_file()
