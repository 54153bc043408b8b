"""`copylora copy-machine`: two kohya runs (stand-in checkout), copylora's merge of B - A, reuse on rerun.

The last test trains for real with kohya-ss/sd-scripts; it runs only when COPYLORA_SD_SCRIPTS and
COPYLORA_BASE_MODEL are set (recipe in tests/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from copylora import copy_machine
from copylora.errors import CopyloraError
from copylora.formats.lora_file import read_lora
from copylora.kohya import bake
from copylora.kohya.checkout import find_checkout
from copylora.kohya.job import default_python
from copylora.reports import grid, image_measures
from tests.kohya_tool_fakes import add_tools
from tests.test_train_fakes import PYTHON, FakeKohya, dump_with_cuda, read_log


class Setup(FakeKohya):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(tmp_path, monkeypatch)
        add_tools(self.sd_scripts)
        # a checkpoint kohya's merge_lora.py can read: one .safetensors file (3 x 1000 float32 values)
        save_file({f"w{i}": torch.zeros(1000) for i in range(3)}, str(self.base))
        for name in ("FAKE_BAKE_EXIT", "FAKE_GEN_EXIT", "FAKE_GEN_SKIP"):
            monkeypatch.delenv(name, raising=False)
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
        """Which LoRAs kohya trained so far, in order ("bake" for a merge_lora.py run, "gen" for gen_img)."""
        names = {"merge_lora.py": "bake", "sdxl_merge_lora.py": "bake", "gen_img.py": "gen", "sdxl_gen_img.py": "gen"}
        return [names.get(run["script"]) or run["config"]["output_name"] for run in read_log(self.log)]


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Setup:
    return Setup(tmp_path, monkeypatch)


def dense_deltas(path: Path) -> dict[str, torch.Tensor]:
    deltas = {}
    for name, module in read_lora(path).modules.items():
        alpha = module.rank if module.alpha is None else module.alpha
        deltas[name] = (module.up.float() @ module.down.float()) * (alpha / module.rank)
    return deltas


# fp16 keeps 11 significant bits (unit roundoff 2^-11 ≈ 4.9e-4 per element); a product of two
# rounded factors errs by up to about twice that in the Frobenius norm
FP16_ROUNDING = 2 * 2.0**-11


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
        f"--ratios 1 -1 --new_rank 16 --save_precision fp16 --save_to {setup.output} --device cpu "
        "--clamp_quantile 1.0 --report"
    )
    assert not setup.output.parent.exists() and setup.trained() == []


def test_stock_clamp_and_dynamic_rank_pass_through(setup, capsys):
    argv = setup.args("--clamp_quantile", "0.99", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9")
    assert copy_machine.main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(
        "--clamp_quantile 0.99 --report --dynamic_method sv_fro --dynamic_param 0.9")
    assert copy_machine.main(argv) == 0
    a, b, merged = (dense_deltas(p) for p in (setup.work / "A.safetensors", setup.work / "B.safetensors", setup.output))
    errors = [relative_error(merged[name], b[name] - a[name]) for name in merged]
    assert max(errors) > 10 * FP16_ROUNDING  # the clamp (and the dynamic cut) lose more than the rounding
    report = setup.output.with_suffix(".report.md").read_text()
    assert "rank up to 16 by sv_fro 0.9, clamped at the 0.99 quantile as stock svd_merge_lora.py" in report


@pytest.mark.parametrize("bad, message", [
    (["--clamp_quantile", "0"], "--clamp_quantile: must be in (0, 1], got 0.0"),
    (["--dynamic_param", "0.9"], "--dynamic_param: given without --dynamic_method"),
])
def test_bad_merge_options_stop_before_training(setup, capsys, bad, message):
    assert copy_machine.main(setup.args(*bad)) == 2
    assert message in capsys.readouterr().err and setup.trained() == []


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
    for name in merged:  # rank 16 holds B - A of two rank-8 LoRAs exactly: what is left is fp16's rounding
        expected = b[name] - a[name]
        assert relative_error(merged[name], expected) < FP16_ROUNDING

    report = setup.output.with_suffix(".report.md").read_text()
    for text in (str(setup.before), str(setup.after), str(setup.work / "A.toml"), "--ratios 1 -1", "trained in",
                 "--set max_train_steps=2", "rank 16, the exact difference (no clamp)", "method: subtract",
                 "| merge B - A |",
                 "fidelity: fidelity vs exact delta: retained", "![A before, B after](edit.training.png)"):
        assert text in report
    layout = grid.read_layout(setup.output.with_suffix(".training.png"))
    assert layout["columns"] == ["A (before)", "B (after)"] and layout["images"] == [[str(setup.before), str(setup.after)]]


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

    def failing_merge(argv):
        calls.append(argv)
        raise CopyloraError("merge failed on purpose")

    monkeypatch.setattr(copy_machine, "merge", failing_merge)
    assert copy_machine.main(setup.args()) == 2  # the merge failed: both LoRAs are trained
    assert "merge failed on purpose" in capfd.readouterr().err
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


# ---------------------------------------------------------------- method 2: train B on base + A


def merged_base(setup: Setup) -> Path:
    return setup.work / "A_merged.safetensors"


def test_merged_base_dry_run_prints_every_command(setup, capsys):
    assert copy_machine.main(setup.args("--method", "merged-base", "--dry-run")) == 0
    out = capsys.readouterr().out
    bake_line = out.split("# ---- bake A into the base")[1].splitlines()[2]
    assert bake_line == (f"{PYTHON} networks/merge_lora.py --sd_model {setup.base} --models {setup.work / 'A.safetensors'} "
                         f"--ratios 1 --save_precision fp16 --save_to {merged_base(setup)}")
    b_part = out.split("# ---- LoRA B")[1]
    assert f'pretrained_model_name_or_path = "{merged_base(setup)}"' in b_part
    assert f"# ---- output: a copy of {setup.work / 'B.safetensors'}" in out and "copylora.merge" not in out
    assert not setup.root.joinpath("out").exists() and setup.trained() == []


def test_merged_base_bakes_a_and_trains_b_on_it(setup, capsys):
    assert copy_machine.main(setup.args("--method", "merged-base")) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(setup.output)
    assert setup.trained() == ["A", "bake", "B"]
    runs = read_log(setup.log)
    assert runs[1]["sd_model"] == str(setup.base) and runs[1]["models"] == [str(setup.work / "A.safetensors")]
    assert runs[1]["ratios"] == [1.0] and runs[1]["cwd"] == str(setup.sd_scripts)
    assert runs[0]["config"]["pretrained_model_name_or_path"] == str(setup.base)
    assert runs[2]["config"]["pretrained_model_name_or_path"] == str(merged_base(setup))
    assert setup.output.read_bytes() == (setup.work / "B.safetensors").read_bytes()
    assert merged_base(setup).is_file()
    report = setup.output.with_suffix(".report.md").read_text()
    for text in ("method: merged-base", "| bake A into the base | baked in", "merged checkpoint (kept)",
                 "fidelity: none lost", "| LoRA B | trained in"):
        assert text in report


def test_merged_base_resumes_and_rebakes_only_when_a_changes(setup):
    args = setup.args("--method", "merged-base")
    assert copy_machine.main(args) == 0
    assert copy_machine.main(args) == 0
    assert setup.trained() == ["A", "bake", "B"]  # everything reused
    Image.new("RGB", (24, 36), (10, 10, 10)).save(setup.after)
    assert copy_machine.main(args) == 0
    assert setup.trained() == ["A", "bake", "B", "B"]  # the checkpoint reused
    Image.new("RGB", (24, 36), (10, 200, 10)).save(setup.before)
    assert copy_machine.main(args) == 0
    assert setup.trained()[4:] == ["A", "bake", "B"]  # a new A: a new checkpoint, so a new B
    merged_base(setup).write_bytes(b"changed by someone")
    Image.new("RGB", (24, 36), (1, 2, 3)).save(setup.after)
    assert copy_machine.main(args) == 0
    assert setup.trained()[7:] == ["bake", "B"]  # a changed checkpoint is not reused


def test_merged_base_deletes_the_checkpoint_on_request(setup, capsys):
    args = setup.args("--method", "merged-base", "--delete-merged-base")
    assert copy_machine.main(args) == 0
    assert not merged_base(setup).exists() and "deleted the merged checkpoint" in capsys.readouterr().out
    assert "merged checkpoint (deleted)" in setup.output.with_suffix(".report.md").read_text()
    assert copy_machine.main(args) == 0  # B is still good: nothing baked again
    assert setup.trained() == ["A", "bake", "B"]
    Image.new("RGB", (24, 36), (10, 10, 10)).save(setup.after)
    assert copy_machine.main(args) == 0  # B must be retrained: the checkpoint is needed again
    assert setup.trained() == ["A", "bake", "B", "bake", "B"]


def test_merged_base_bake_failure_resumes(setup, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_BAKE_EXIT", "5")
    assert copy_machine.main(setup.args("--method", "merged-base")) == 5
    err = capfd.readouterr().err
    assert "merged checkpoint: kohya's networks/merge_lora.py exited with code 5" in err and "rerun to resume" in err
    assert not bake.BakeJob(setup.sd_scripts, PYTHON, False, setup.base, setup.work / "A.safetensors",
                            merged_base(setup), "fp16").stamp_path.exists()
    monkeypatch.delenv("FAKE_BAKE_EXIT")
    assert copy_machine.main(setup.args("--method", "merged-base")) == 0
    assert setup.trained() == ["A", "bake", "bake", "B"]


def test_merged_base_refuses_when_the_disk_is_too_small(setup, capsys, monkeypatch):
    usage = shutil.disk_usage(setup.root)
    monkeypatch.setattr(bake.shutil, "disk_usage", lambda path: usage._replace(free=9_000))
    # the base holds 3000 values: 12000 bytes (+5%) at float do not fit in 9 kB, 6000 at fp16 do
    assert copy_machine.main(setup.args("--method", "merged-base", "--bake-precision", "float")) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (f"python -m copylora.copy_machine: error: {setup.work}: the merged checkpoint (base + A, float) needs about "
                     "12600 bytes, only 9000 bytes free there; free some space or pass --work-dir on a bigger disk")
    assert setup.trained() == []
    assert copy_machine.main(setup.args("--method", "merged-base")) == 0
    assert setup.trained() == ["A", "bake", "B"]


def test_merged_base_needs_a_checkpoint_file(setup, capsys):
    folder = setup.root / "diffusers-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    args = setup.args("--method", "merged-base")
    args[args.index("--base") + 1] = str(folder)
    assert copy_machine.main(args) == 2
    assert "a diffusers folder; kohya's networks/merge_lora.py reads one .safetensors/.ckpt" in capsys.readouterr().err


def test_merged_base_sdxl_uses_sdxl_merge_lora(setup, capsys):
    dump = dump_with_cuda("sdxl_train_network.py", False, setup.root / "sdxl.json")
    args = setup.args("--method", "merged-base", "--sdxl", "--dry-run")
    args[args.index("--kohya-args") + 1] = str(dump)
    assert copy_machine.main(args) == 0
    assert f"{PYTHON} networks/sdxl_merge_lora.py --sd_model {setup.base}" in capsys.readouterr().out


def test_copy_machine_preview_puts_the_grid_in_the_report(setup):
    preview_args = "--width 16 --height 24 --steps 2 --seeds 7 -- --tokenizer_cache_dir /nowhere"
    assert copy_machine.main(setup.args("--method", "merged-base", "--preview", "--preview-args", preview_args)) == 0
    gen = read_log(setup.log)[-1]
    assert gen["script"] == "gen_img.py" and [c["am"] for c in gen["cells"]] == [0.0, 0.5, 1.0]
    assert gen["argv"][-2:] == ["--tokenizer_cache_dir", "/nowhere"]
    assert gen["argv"][gen["argv"].index("--network_weights") + 1] == str(setup.output)
    grid_path = setup.output.parent / "edit_preview" / "grid.png"
    layout = grid.read_layout(grid_path)
    assert layout["rows"] == ["seed 7"] and len(layout["images"][0]) == 4  # 3 strengths and the difference column
    report = setup.output.with_suffix(".report.md").read_text()
    assert "![preview grid](edit_preview/grid.png)" in report and "| preview |" in report
    scores = json.loads((grid_path.parent / "scores.json").read_text(encoding="utf-8"))["cells"]
    assert [row["strength"] for row in scores] == [0, 0.5, 1]
    assert "| prompt | seed | strength | structure kept | ΔE | ΔC* | changed |" in report
    for row in scores[1:]:  # the measured cells, one table row each
        assert (f"| (empty prompt) | 7 | {row['strength']:g} | {row['structure_kept']:.3f} | {row['delta_e']:.2f} | "
                f"{image_measures.signed(row['delta_chroma'], 2)} | {row['changed_share']:.0%} |") in report


def test_bad_preview_args_stop_before_training(setup, capsys):
    with pytest.raises(SystemExit) as exit_:
        copy_machine.main(setup.args("--preview", "--preview-args", "--steps many"))
    assert exit_.value.code == 2 and setup.trained() == []


def training_pair(folder: Path) -> tuple[Path, Path]:
    """A colour picture (A) and its monochrome copy (B), 64 x 96, as in the article."""
    mandelbrot = Image.effect_mandelbrot((64, 96), (-2.0, -1.5, 1.0, 1.5), 60)  # grayscale
    colour = Image.merge("RGB", (mandelbrot, mandelbrot.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
                                 Image.eval(mandelbrot, lambda v: 255 - v)))
    before, after = folder / "before.png", folder / "after.png"
    colour.save(before)
    colour.convert("L").convert("RGB").save(after)
    return before, after


KOHYA = os.environ.get("COPYLORA_SD_SCRIPTS")
BASE = os.environ.get("COPYLORA_BASE_MODEL")


@pytest.mark.kohya
@pytest.mark.skipif(not (KOHYA and BASE), reason="set COPYLORA_SD_SCRIPTS and COPYLORA_BASE_MODEL (tests/README.md)")
def test_real_kohya_trains_and_merges(tmp_path, capsys):
    """2 steps at 64 px per LoRA with the real train_network.py, then the real merge; then a rerun reuses both."""
    before, after = training_pair(tmp_path)
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


@pytest.mark.kohya
@pytest.mark.skipif(not (KOHYA and BASE), reason="set COPYLORA_SD_SCRIPTS and COPYLORA_BASE_MODEL (tests/README.md)")
def test_real_kohya_merged_base_and_preview(tmp_path, capsys):
    """Method 2 with the real scripts: train A, bake it with merge_lora.py, train B on it (2 steps, 64 px each),
    then the preview with the real gen_img.py (64 px, 2 sampling steps): a grid of real PNGs.

    merge_lora.py reads one checkpoint file: COPYLORA_BASE_MODEL's .safetensors sibling (tests/README.md)."""
    base = Path(BASE).with_suffix(".safetensors")
    if not base.is_file():
        pytest.skip(f"{base}: no single-file copy of the base model (tests/README.md, step 2)")
    work = tmp_path / "作業 フォルダ"  # paths with spaces and Japanese, as many kohya users have
    work.mkdir()
    before, after = training_pair(work)
    output = work / "edit.safetensors"
    python = os.environ.get("COPYLORA_KOHYA_PYTHON")
    tokenizers = os.environ.get("COPYLORA_TOKENIZER_CACHE_DIR")
    preview_args = "--width 64 --height 64 --steps 2 --seeds 1 2" + (f" -- --tokenizer_cache_dir {tokenizers}"
                                                                     if tokenizers else "")
    args = ["--method", "merged-base", "--sd-scripts", KOHYA, "--base", str(base), "--before", str(before),
            "--after", str(after), "--output", str(output), "--set", "max_train_steps=2", "--set", "resolution=64",
            "--delete-merged-base", "--preview", "--preview-args", preview_args]
    args += ["--python", python] if python else []
    args += ["--set", f"tokenizer_cache_dir={tokenizers}"] if tokenizers else []
    assert copy_machine.main(args) == 0
    lora_b = read_lora(work / "edit_work" / "B.safetensors")
    assert output.read_bytes() == (work / "edit_work" / "B.safetensors").read_bytes() and len(lora_b.modules) > 100
    assert not (work / "edit_work" / "A_merged.safetensors").exists()

    layout = grid.read_layout(work / "edit_preview" / "grid.png")
    assert layout["rows"] == ["seed 1", "seed 2"]
    assert layout["columns"] == ["strength 0", "strength 0.5", "strength 1", "dE 1 vs 0"]
    sheet = Image.open(work / "edit_preview" / "grid.png").convert("RGB")
    (x0, y0), (w, h), dx, dy = layout["origin"], layout["cell"], layout["column_step"], layout["row_step"]
    assert (w, h) == (128, 128) and sheet.size == (x0 + 4 * dx, y0 + 2 * dy)
    for r, row in enumerate(layout["images"]):
        for c, path in enumerate(row):
            single = Image.open(path)
            assert single.size == (64, 64) and (c == 3 or single.info["seed"] == str(r + 1))
            cell = sheet.crop((x0 + c * dx, y0 + r * dy, x0 + c * dx + w, y0 + r * dy + h))
            assert cell.tobytes() == single.convert("RGB").resize((w, h), Image.Resampling.NEAREST).tobytes()
    for c in range(4):  # each column label is drawn
        assert sheet.crop((x0 + c * dx, 0, x0 + c * dx + w, y0)).convert("L").getextrema()[0] < 128
    # every cell measured against strength 0 of its seed, the difference column the heatmap of strength 1
    scores = json.loads((work / "edit_preview" / "scores.json").read_text(encoding="utf-8"))["cells"]
    assert [(row["seed"], row["strength"]) for row in scores] == [(s, m) for s in (1, 2) for m in (0, 0.5, 1)]
    for r, row in enumerate(layout["images"]):
        reference = image_measures.read_rgb(Path(row[0]))
        for c, path in enumerate(row[:3]):
            measures, delta_e = image_measures.compare(reference, image_measures.read_rgb(Path(path)))
            assert scores[3 * r + c]["image"] == path
            assert {k: scores[3 * r + c][k] for k in measures.as_dict()} == measures.as_dict()
        assert (image_measures.read_rgb(Path(row[3])) == image_measures.heatmap(delta_e)).all()
    assert all(row["structure_kept"] == 1 and row["delta_e"] == 0 for row in scores if row["strength"] == 0)
    report = output.with_suffix(".report.md").read_text()
    assert "![preview grid](edit_preview/grid.png)" in report and "merged checkpoint (deleted)" in report
    assert "| prompt | seed | strength | structure kept | ΔE | ΔC* | changed |" in report
    # the empty prompt is written "()": gen_img's own prompt parser makes the same (no) text of both
    check = "from gen_img import parse_prompt_attention as p; assert p('()') == p('') == [['', 1.0]], p('()')"
    done = subprocess.run([python or default_python(find_checkout(KOHYA)), "-c", check], cwd=find_checkout(KOHYA),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
