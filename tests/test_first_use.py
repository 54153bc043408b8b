"""What a new user runs into first: a closed pipe, the demo's --out, the name a command calls
itself, --version, preview's checks before gen_img, and paths printed for pasting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from copylora import __version__, cli, demo, merge, patch, preview
from tests.test_patch import STANDIN_RESIZE, make_checkout
from tests.test_preview import Kohya
from tests.test_train_fakes import write_tiny_lora

REPO = Path(__file__).resolve().parent.parent
LORA = REPO / "tests" / "data" / "golden" / "real_sd15" / "A.safetensors"


def run_into_closed_pipe(*argv: str) -> subprocess.CompletedProcess:
    """Run `copylora ARGV` with stdout a pipe whose reader has already gone, as `| head -1` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "copylora", *argv], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("argv", [["doctor"], ["inspect", str(LORA)], ["--help"], ["--version"], ["merge", "--help"]])
def test_a_closed_pipe_ends_the_command_quietly(argv: list[str]) -> None:
    result = run_into_closed_pipe(*argv)
    assert result.stderr == ""
    assert result.returncode in (0, 128 + 13)  # 141: what a shell reports for a writer SIGPIPE ended


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_demo_out_with_a_file_in_the_way_is_one_line(tmp_path: Path, capsys, where: str) -> None:
    existing = tmp_path / "existing.txt"
    existing.write_text("mine")
    out = existing if where == "file" else existing / "sub"
    assert demo.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m copylora.demo: error: --out {out}: a file is in the way; give a folder (new or existing)\n"
    assert existing.read_text() == "mine"


def test_demo_says_what_it_wrote_and_what_to_try_next(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo folder"
    assert demo.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    quoted = f'"{out / "difference.safetensors"}"'  # a folder with a space: quoted for pasting
    assert f"{quoted} is B - A as stock svd_merge_lora.py writes it" in printed
    assert f"copylora inspect {quoted} --against" in printed and "--clamp_quantile 1" in printed


def test_commands_name_themselves_as_the_user_ran_them(capsys) -> None:
    assert cli.main(["merge", "--models", str(LORA)]) == 2
    assert capsys.readouterr().err.startswith("copylora merge: error: --ratios")
    assert merge.main(["--models", str(LORA)]) == 2
    assert capsys.readouterr().err.startswith("python -m copylora.merge: error: --ratios")
    with pytest.raises(SystemExit):
        cli.main(["copy-machine", "--no-such-option"])
    assert capsys.readouterr().err.startswith("usage: copylora copy-machine ")
    with pytest.raises(SystemExit):
        merge.main(["--no-such-option"])  # a command run after the console script's is named by its module again
    assert capsys.readouterr().err.startswith("usage: python -m copylora.merge ")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(capsys, flag: str) -> None:
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"{__version__}\n"


@pytest.fixture
def kohya(tmp_path, monkeypatch) -> Kohya:
    return Kohya(tmp_path, monkeypatch)


def test_preview_refuses_a_text_file_as_the_lora_before_gen_img(kohya: Kohya, capsys) -> None:
    kohya.lora = kohya.lora.with_name("notes.txt")
    kohya.lora.write_text("not a LoRA")
    assert preview.main(kohya.args()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m copylora.preview: error: {kohya.lora}: ") and err.count("\n") == 1
    assert kohya.gen_runs() == []


def test_preview_refuses_a_lora_as_the_base_before_gen_img(kohya: Kohya, capsys) -> None:
    kohya.base = write_tiny_lora(kohya.base.with_name("lora_as_base.safetensors"))
    assert preview.main(kohya.args()) == 2
    err = capsys.readouterr().err
    assert err == f"python -m copylora.preview: error: {kohya.base}: a LoRA, not a base model (give it as the LoRA; " \
                  "the base is a .safetensors/.ckpt checkpoint or a diffusers folder)\n"
    assert kohya.gen_runs() == []


def test_preview_refuses_a_folder_that_is_no_diffusers_model(kohya: Kohya, capsys) -> None:
    kohya.base = kohya.base.with_name("some folder")
    kohya.base.mkdir()
    assert preview.main(kohya.args()) == 2
    assert "a folder without model_index.json: not a diffusers model" in capsys.readouterr().err


def test_patch_undo_hint_is_quoted_for_pasting(tmp_path: Path, capsys) -> None:
    root = make_checkout(tmp_path / "Kohya GUI 日本語" / "sd-scripts")
    (root / "networks" / "resize_lora.py").write_bytes(STANDIN_RESIZE)
    assert patch.main(["install", "--sd-scripts", str(root), "--python", sys.executable]) == 0
    out = capsys.readouterr().out
    assert f'(undo: python -m copylora.patch uninstall --sd-scripts "{root}")' in out
    assert patch.main(["uninstall", "--sd-scripts", str(root)]) == 0


@pytest.mark.parametrize("module", sorted({module for module, _ in cli.COMMANDS.values()}))
def test_every_public_module_runs_with_python_dash_m(module: str) -> None:
    """The entry points kept through the regrouping: `python -m copylora.X --help` from any folder."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=REPO.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module}") and result.stderr == ""
    assert "{None," not in result.stdout  # only choices that are accepted
