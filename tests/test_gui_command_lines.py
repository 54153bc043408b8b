"""The command lines Kohya's GUI v26 builds for its Resize LoRA and SVD-merge tabs, run through a
patched stand-in checkout (tests/data/kohya/gui_v26_command_lines.json says where they came from).

The stand-in originals define, as literal add_argument calls, the options of kohya's dumps (resize:
the newer 063ef100 script, which has --svd_lowrank_niter) plus one option no copylora knows; run,
they only record that they ran. The merge and resize are copylora's real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from copylora import merge as merge_cli
from copylora import resize as resize_cli
from copylora.kohya import checkout as sd_checkout
from tests.conftest import kohya_file
from tests.test_patch import load_output, write_lora

REPO = Path(__file__).resolve().parent.parent
GUI = json.loads(kohya_file("gui_v26_command_lines.json").read_text())
NEWER_ONLY = "--only_in_newer_kohya"  # an option a future kohya might add


def standin_script(dump: str) -> str:
    """A stock-script stand-in: kohya's options (from the dump) as literal add_argument calls."""
    lines = []
    for option in json.loads(kohya_file(dump).read_text())["options"]:
        if option["action"] == "_HelpAction":
            continue
        if option["action"] == "_StoreTrueAction":
            lines.append(f"parser.add_argument({option['flags'][0]!r}, action='store_true')")
        else:
            nargs = f", nargs={option['nargs']!r}" if option["nargs"] else ""
            lines.append(f"parser.add_argument({option['flags'][0]!r}{nargs})")
    lines.append(f"parser.add_argument({NEWER_ONLY!r}, action='store_true')")
    body = "\n".join(lines)
    return textwrap.dedent(
        """\
        # stand-in for a newer kohya script (test fixture)
        import argparse
        import json
        import sys

        parser = argparse.ArgumentParser()
        {body}
        args = parser.parse_args()
        with open(args.save_to + ".original.json", "w") as f:
            json.dump(sys.argv[1:], f)
        """
    ).format(body=body)


@pytest.fixture
def gui_root(tmp_path: Path) -> Path:
    """A Kohya's GUI folder whose sd-scripts/ is patched by copylora."""
    root = tmp_path / "kohya_ss"
    networks = root / "sd-scripts" / "networks"
    networks.mkdir(parents=True)
    (root / "sd-scripts" / "library").mkdir()
    (root / "sd-scripts" / "library" / "__init__.py").write_text("")
    (networks / "lora.py").write_text("")
    (networks / "resize_lora.py").write_text(standin_script("resize_lora_args_063ef100.json"))
    (networks / "svd_merge_lora.py").write_text(standin_script("svd_merge_lora_args.json"))
    sd_checkout.install_all(sd_checkout.find_checkout(root))
    for seed, name in enumerate("abcd"):
        write_lora(tmp_path / f"lora_{name}.safetensors", seed + 1)
    return root


def gui_argv(template: list[str], root: Path, save_to: Path) -> list[str]:
    """The GUI's list with its placeholders filled in (device cpu: there is no GPU here)."""
    folder = save_to.parent
    values = {"{PYTHON}": sys.executable, "{save_to}": str(save_to), "{device}": "cpu",
              "{model}": str(folder / "lora_a.safetensors"),
              **{f"{{lora_{n}}}": str(folder / f"lora_{n}.safetensors") for n in "abcd"}}
    return [values.get(a, a).replace("{SD_SCRIPTS}", str(root / "sd-scripts")) for a in template]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COPYLORA_USE_ORIGINAL"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def without(argv: list[str], flag: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


@pytest.mark.parametrize("variant", ["argv", "argv_dynamic_none"])
def test_gui_resize_runs_copylora_and_niter_changes_nothing(gui_root: Path, tmp_path: Path, variant: str) -> None:
    out = tmp_path / f"gui_{variant}.safetensors"
    argv = gui_argv(GUI["resize"][variant], gui_root, out)
    assert argv[argv.index("--svd_lowrank_niter") + 1] == "2"
    proc = run(argv, gui_root)
    assert proc.returncode == 0, proc.stderr
    assert "running the original" not in proc.stderr and not Path(f"{out}.original.json").exists()

    plain = tmp_path / f"plain_{variant}.safetensors"
    plain_argv = without(gui_argv(GUI["resize"][variant], gui_root, plain), "--svd_lowrank_niter")
    proc = run([sys.executable, "-m", "copylora.resize", *plain_argv[2:]], tmp_path)
    assert proc.returncode == 0, proc.stderr
    gui_tensors, gui_meta = load_output(out)
    assert len(gui_tensors) > 0 and (gui_tensors, gui_meta) == load_output(plain)


@pytest.mark.parametrize("variant", ["argv_two_models", "argv_four_models"])
def test_gui_svd_merge_runs_copylora(gui_root: Path, tmp_path: Path, variant: str) -> None:
    out = tmp_path / f"gui_{variant}.safetensors"
    argv = gui_argv(GUI["svd_merge"][variant], gui_root, out)
    proc = run(argv, gui_root)
    assert proc.returncode == 0, proc.stderr
    assert "running the original" not in proc.stderr and not Path(f"{out}.original.json").exists()

    direct = tmp_path / f"direct_{variant}.safetensors"
    proc = run([sys.executable, "-m", "copylora.merge", *gui_argv(GUI["svd_merge"][variant], gui_root, direct)[2:]],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert load_output(out) == load_output(direct) and len(load_output(out)[0]) > 0


@pytest.mark.parametrize("tab,variant", [("resize", "argv"), ("svd_merge", "argv_two_models")])
def test_an_option_only_the_original_knows_runs_the_original(gui_root: Path, tmp_path: Path, tab: str,
                                                             variant: str) -> None:
    out = tmp_path / "out.safetensors"
    argv = gui_argv(GUI[tab][variant], gui_root, out) + [NEWER_ONLY]
    proc = run(argv, gui_root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"copylora does not know {NEWER_ONLY}; running the original script"]
    assert json.loads(Path(f"{out}.original.json").read_text()) == argv[2:]
    assert not out.exists()


def test_an_option_nobody_knows_is_copyloras_error(gui_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    proc = run(gui_argv(GUI["resize"]["argv"], gui_root, out) + ["--no_such_option"], gui_root)
    assert proc.returncode == 2 and "unrecognized arguments: --no_such_option" in proc.stderr
    assert "running the original" not in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not Path(f"{out}.original.json").exists()


@pytest.mark.parametrize("dump,parser", [("resize_lora_args_063ef100.json", resize_cli.build_parser),
                                         ("svd_merge_lora_args.json", merge_cli.build_parser)])
def test_copylora_accepts_every_option_of_the_newest_readable_kohya(dump: str, parser) -> None:
    flags = {flag for option in json.loads(kohya_file(dump).read_text())["options"] for flag in option["flags"]}
    assert flags - set(parser()._option_string_actions) == set()


@pytest.mark.parametrize("value", ["-1", "two"])
def test_svd_lowrank_niter_must_be_a_non_negative_int(tmp_path: Path, capsys, value: str) -> None:
    out = tmp_path / "out.safetensors"
    write_lora(tmp_path / "a.safetensors", 1)
    try:  # argparse's own exit, or run_cli's return
        code = resize_cli.main(["--model", str(tmp_path / "a.safetensors"), "--save_to", str(out),
                                "--svd_lowrank_niter", value])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "argument --svd_lowrank_niter: must be an integer >= 0" in err.splitlines()[-1]
    assert not out.exists()
