"""`copylora copy-machine`: two kohya runs (stand-in checkout), copylora's merge of B - A, reuse on rerun.

The last test trains for real with kohya-ss/sd-scripts; it runs only when COPYLORA_SD_SCRIPTS and
COPYLORA_BASE_MODEL are set (recipe in tests/README.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from copylora import copy_machine
from copylora.lora_file import read_lora
from tests.test_train_fakes import PYTHON, FakeKohya, dump_with_cuda, read_log


class Setup(FakeKohya):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(tmp_path, monkeypatch)
        self.dump = dump_with_cuda("train_network.py", False, tmp_path / "options.json")
        self.before = self.image("before.png", (200, 30, 30))
        self.after = self.image("after.png", (90, 90, 90))
        self.output = tmp_path / "out" / "edit.safetensors"
        self.work = tmp_path / "out" / "edit_work"

    def image(self, name: str, color) -> Path:
        path = self.root / name
        Image.new("RGB", (24, 36), color).save(path)
        return path

    def args(self, *extra: str) -> list[str]:
        return ["--sd-scripts", str(self.sd_scripts), "--base", str(self.base), "--before", str(self.before),
                "--after", str(self.after), "--output", str(self.output), "--python", PYTHON,
                "--kohya-args", str(self.dump), "--set", "max_train_steps=2", *extra]

    def trained(self) -> list[str]:
        """Which LoRAs kohya trained so far, in order."""
        return [run["config"]["output_name"] for run in read_log(self.log)]


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Setup:
    return Setup(tmp_path, monkeypatch)


def dense_deltas(path: Path) -> dict[str, torch.Tensor]:
    deltas = {}
    for name, module in read_lora(path).modules.items():
        alpha = module.rank if module.alpha is None else module.alpha
        deltas[name] = (module.up.float() @ module.down.float()) * (alpha / module.rank)
    return deltas


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


def test_dry_run(setup, capsys):
    assert copy_machine.main(setup.args("--dry-run")) == 0
    out = capsys.readouterr().out
    assert "# ---- LoRA A" in out and "# ---- LoRA B" in out
    assert f"--config_file {setup.work / 'A.toml'}" in out and f"--config_file {setup.work / 'B.toml'}" in out
    assert f"{setup.work / 'A_dataset' / '5'}/ (no caption files)" in out
    merge_line = out.strip().splitlines()[-1]
    assert merge_line == (
        f"python -m copylora.merge --models {setup.work / 'B.safetensors'} {setup.work / 'A.safetensors'} "
        f"--ratios 1 -1 --new_rank 16 --save_precision fp16 --save_to {setup.output} --device cpu"
    )
    assert not setup.output.parent.exists() and setup.trained() == []


def test_trains_both_and_writes_b_minus_a(setup, capsys):
    assert copy_machine.main(setup.args()) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == str(setup.output)
    assert setup.trained() == ["A", "B"]
    runs = read_log(setup.log)
    assert [run["dataset"][-1] for run in runs] == ["5/before.png", "5/after.png"]
    assert runs[0]["config"] == {**runs[1]["config"], "output_name": "A", "train_data_dir": str(setup.work / "A_dataset")}

    a, b, merged = (dense_deltas(p) for p in (setup.work / "A.safetensors", setup.work / "B.safetensors", setup.output))
    assert set(merged) == set(a)
    assert {m.rank for m in read_lora(setup.output).modules.values()} == {16}
    for name in merged:  # rank 16 holds B - A of two rank-8 LoRAs; kohya's 99% quantile clamp trims the tails
        expected = b[name] - a[name]
        assert relative_error(merged[name], expected) < 0.3
        assert relative_error(merged[name], -expected) > 1.5 and relative_error(merged[name], b[name]) > 0.5

    report = setup.output.with_suffix(".report.md").read_text()
    for text in (str(setup.before), str(setup.after), str(setup.work / "A.toml"), "--ratios 1 -1", "trained in",
                 "--set max_train_steps=2", "rank 16"):
        assert text in report


def test_rerun_reuses_what_is_unchanged(setup, capsys):
    assert copy_machine.main(setup.args()) == 0
    capsys.readouterr()
    assert copy_machine.main(setup.args()) == 0
    out = capsys.readouterr().out
    assert setup.trained() == ["A", "B"]  # nothing trained again
    assert "LoRA A: reusing" in out and "LoRA B: reusing" in out and "images and config unchanged" in out
    assert "reused (trained " in setup.output.with_suffix(".report.md").read_text()

    Image.new("RGB", (24, 36), (10, 10, 10)).save(setup.after)  # a new edit: only B again
    assert copy_machine.main(setup.args()) == 0
    assert setup.trained() == ["A", "B", "B"]

    assert copy_machine.main(setup.args("--set", "learning_rate=2e-4")) == 0  # a new config: both
    assert setup.trained() == ["A", "B", "B", "A", "B"]


def test_a_changed_lora_file_is_retrained(setup):
    assert copy_machine.main(setup.args()) == 0
    lora_a = setup.work / "A.safetensors"
    lora_a.write_bytes(lora_a.read_bytes()[:-4] + b"\0\0\0\0")
    assert copy_machine.main(setup.args()) == 0
    assert setup.trained() == ["A", "B", "A"]


def test_interrupted_run_resumes_at_the_missing_step(setup, capfd, monkeypatch):
    calls = []
    monkeypatch.setattr(copy_machine, "merge", lambda argv: calls.append(argv) or 1)
    assert copy_machine.main(setup.args()) == 1  # the merge failed: both LoRAs are trained
    assert "the merge exited with code 1" in capfd.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("FAKE_KOHYA_LOG", str(setup.log))
    monkeypatch.setenv("PYTHONPATH", str(setup.root / "fake_site"))
    assert copy_machine.main(setup.args()) == 0
    assert setup.trained() == ["A", "B"] and len(calls) == 1


def test_kohya_failure_stops_and_rerun_trains_only_what_is_missing(setup, capfd, monkeypatch):
    assert copy_machine.main(setup.args()) == 0
    Image.new("RGB", (24, 36), (10, 10, 10)).save(setup.after)
    monkeypatch.setenv("FAKE_KOHYA_EXIT", "7")
    assert copy_machine.main(setup.args()) == 7
    err = capfd.readouterr().err
    assert "LoRA B: kohya's train_network.py exited with code 7" in err and "rerun to resume" in err
    monkeypatch.delenv("FAKE_KOHYA_EXIT")
    assert copy_machine.main(setup.args()) == 0
    assert setup.trained() == ["A", "B", "B", "B"]  # A reused throughout
    assert "LoRA A: reusing" in capfd.readouterr().out


def test_output_must_be_safetensors(setup, capsys):
    args = setup.args()
    args[args.index("--output") + 1] = str(setup.root / "edit.ckpt")
    assert copy_machine.main(args) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err


KOHYA = os.environ.get("COPYLORA_SD_SCRIPTS")
BASE = os.environ.get("COPYLORA_BASE_MODEL")


@pytest.mark.kohya
@pytest.mark.skipif(not (KOHYA and BASE), reason="set COPYLORA_SD_SCRIPTS and COPYLORA_BASE_MODEL (tests/README.md)")
def test_real_kohya_trains_and_merges(tmp_path, capsys):
    """2 steps at 64 px per LoRA with the real train_network.py, then the real merge; then a rerun reuses both."""
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    picture = Image.effect_mandelbrot((64, 96), (-2.0, -1.5, 1.0, 1.5), 60).convert("RGB")
    picture.save(before)
    picture.convert("L").convert("RGB").save(after)
    output = tmp_path / "edit.safetensors"
    args = ["--sd-scripts", KOHYA, "--base", BASE, "--before", str(before), "--after", str(after),
            "--output", str(output), "--set", "max_train_steps=2", "--set", "resolution=64"]
    if os.environ.get("COPYLORA_KOHYA_PYTHON"):
        args += ["--python", os.environ["COPYLORA_KOHYA_PYTHON"]]
    if os.environ.get("COPYLORA_TOKENIZER_CACHE_DIR"):
        args += ["--set", f"tokenizer_cache_dir={os.environ['COPYLORA_TOKENIZER_CACHE_DIR']}"]
    assert copy_machine.main(args) == 0
    merged = read_lora(output)
    assert {m.rank for m in merged.modules.values()} <= {16} and len(merged.modules) > 100
    assert read_lora(output.parent / "edit_work" / "A.safetensors").modules.keys() == merged.modules.keys()
    capsys.readouterr()
    assert copy_machine.main(args) == 0
    out = capsys.readouterr().out
    assert "LoRA A: reusing" in out and "LoRA B: reusing" in out
