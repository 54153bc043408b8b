"""copylora.patch / copylora.kohya.checkout and the shim in sd_scripts_patch/.

Every test builds its own fake sd-scripts tree (and Kohya's GUI root) in a tmp dir, with a tiny
stand-in networks/svd_merge_lora.py written here; nothing from kohya-ss/sd-scripts is used.
The `kohya`-marked test at the end runs against a real checkout named by COPYLORA_SD_SCRIPTS.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from copylora import cli, patch
from copylora.kohya import checkout as sd_checkout
from copylora.errors import CopyloraError

REPO = Path(__file__).resolve().parent.parent
NETWORKS = "networks"

# The stand-in "stock" script: imports like kohya's (a sibling module from networks/, a package
# from the checkout root), records how it was run into <save_to>.original.json, and exits with
# --exit_code (or raises with --crash) so exit-code pass-through can be checked.
STANDIN_ORIGINAL = textwrap.dedent(
    '''\
    # stand-in for kohya's networks/svd_merge_lora.py (test fixture)
    import argparse
    import json
    import os
    import sys

    import lora  # networks/lora.py, found because networks/ is sys.path[0]
    from library import standin_util  # the checkout root's library/, as kohya's `pip install -e .` provides

    parser = argparse.ArgumentParser()
    parser.add_argument("--save_to")
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--exit_code", type=int, default=0)
    parser.add_argument("--crash", action="store_true")
    args, _ = parser.parse_known_args()
    if __name__ == "__main__":
        with open(args.save_to + ".original.json", "w") as f:
            json.dump({"argv": sys.argv, "file": __file__, "name": __name__, "lora": lora.NAME,
                       "util": standin_util.NAME, "sys_path0": sys.path[0]}, f)
        if args.crash:
            raise RuntimeError("stand-in crashed")
        sys.exit(args.exit_code)
    '''
).encode()

STANDIN_RESIZE = STANDIN_ORIGINAL.replace(b"svd_merge_lora.py", b"resize_lora.py")

# A fake copylora whose merge.main and resize.main record argv; used to check the shim's hand-off on its own.
FAKE_COPYLORA_MERGE = textwrap.dedent(
    '''\
    import json
    import sys

    def main(argv):
        save_to = argv[argv.index("--save_to") + 1]
        with open(save_to + ".copylora.json", "w") as f:
            json.dump({"argv": list(argv), "sys_path": sys.path, "module": __name__}, f)
        return int(argv[argv.index("--exit_code") + 1]) if "--exit_code" in argv else 0
    '''
)


def make_checkout(root: Path) -> Path:
    (root / NETWORKS).mkdir(parents=True)
    (root / "library").mkdir()
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "standin_util.py").write_text('NAME = "library.standin_util"\n')
    (root / NETWORKS / "lora.py").write_text('NAME = "networks.lora"\n')
    script = root / NETWORKS / "svd_merge_lora.py"
    script.write_bytes(STANDIN_ORIGINAL)
    script.chmod(0o755)
    return root


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return make_checkout(tmp_path / "sd-scripts")


@pytest.fixture
def both(tmp_path: Path) -> Path:
    """A checkout with both scripts copylora replaces (an old checkout may lack resize_lora.py)."""
    root = make_checkout(tmp_path / "sd-scripts")
    resize = root / NETWORKS / "resize_lora.py"
    resize.write_bytes(STANDIN_RESIZE)
    resize.chmod(0o755)
    return root


@pytest.fixture
def gui_root(tmp_path: Path) -> Path:
    gui = tmp_path / "kohya_ss"
    make_checkout(gui / "sd-scripts")
    (gui / "kohya_gui.py").write_text("# stand-in GUI entry point\n")
    return gui


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.iterdir()) if p.is_file()}


def status_line(root: Path) -> str:
    return sd_checkout.inspect(sd_checkout.find_checkout(root)).describe()


def run_patch(capsys, *argv: str) -> tuple[int, str, str]:
    code = patch.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def env_with(pythonpath: list[Path] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COPYLORA_USE_ORIGINAL")}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return env


def hide_copylora(tmp_path: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import copylora` fail even where it is installed."""
    hider = tmp_path / "hide_copylora"
    (hider / "copylora").mkdir(parents=True)
    (hider / "copylora" / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'copylora\'")\n')
    return hider


def fake_copylora(tmp_path: Path) -> Path:
    folder = tmp_path / "fake_copylora"
    (folder / "copylora").mkdir(parents=True)
    (folder / "copylora" / "__init__.py").write_text("")
    for command in ("merge", "resize"):  # the same recorder stands in for both commands
        (folder / "copylora" / f"{command}.py").write_text(FAKE_COPYLORA_MERGE)
    return folder


def run_script(
    cwd: Path, script: str, args: list[str], pythonpath: list[Path] | None, **env: str
) -> subprocess.CompletedProcess:
    environ = env_with(pythonpath)
    environ.update(env)
    return subprocess.run(
        [sys.executable, script, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=300
    )


# ---------------------------------------------------------------- install / uninstall / status


def test_install_then_uninstall_restores_bytes_and_mode(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    before = snapshot(networks)
    assert status_line(checkout).startswith("not installed:")

    code, out, _ = run_patch(capsys, "install", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("installed:")
    target = networks / "svd_merge_lora.py"
    assert target.read_bytes() == sd_checkout.shim_path().read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert (networks / sd_checkout.MERGE_SCRIPT.kept).read_bytes() == STANDIN_ORIGINAL
    assert stat.S_IMODE((networks / sd_checkout.MERGE_SCRIPT.kept).stat().st_mode) == 0o755
    record = json.loads((networks / sd_checkout.MERGE_SCRIPT.sidecar).read_text())
    assert record["original_sha256"] == sd_checkout.sha256(STANDIN_ORIGINAL)
    assert record["shim_sha256"] == sd_checkout.sha256(target.read_bytes())
    code, out, _ = run_patch(capsys, "status", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("installed:")

    code, out, _ = run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("uninstalled:")
    assert snapshot(networks) == before  # same files, same bytes, same modes; nothing left behind
    code, out, _ = run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))
    assert code == 0 and "nothing to do" in out
    assert snapshot(networks) == before


def test_install_twice_is_a_no_op(checkout: Path, capsys) -> None:
    assert run_patch(capsys, "install", "--sd-scripts", str(checkout))[0] == 0
    networks = checkout / NETWORKS
    after_first = snapshot(networks)
    mtimes = {p.name: p.stat().st_mtime_ns for p in networks.iterdir()}
    code, out, _ = run_patch(capsys, "install", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("already installed")
    assert snapshot(networks) == after_first
    assert {p.name: p.stat().st_mtime_ns for p in networks.iterdir()} == mtimes  # nothing rewritten


def test_gui_root_and_cli_subcommand(gui_root: Path, capsys) -> None:
    assert sd_checkout.find_checkout(gui_root) == (gui_root / "sd-scripts").resolve()
    assert cli.main(["patch", "install", "--sd-scripts", str(gui_root)]) == 0
    assert capsys.readouterr().out.startswith("installed:")
    assert cli.main(["patch", "status", "--sd-scripts", str(gui_root)]) == 0
    assert capsys.readouterr().out.startswith("installed:")
    assert cli.main(["patch", "uninstall", "--sd-scripts", str(gui_root)]) == 0
    assert (gui_root / "sd-scripts" / NETWORKS / "svd_merge_lora.py").read_bytes() == STANDIN_ORIGINAL


def test_default_dir_is_the_current_folder(checkout: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(checkout)
    code, out, _ = run_patch(capsys, "status")
    assert code == 1 and out.startswith("not installed:")


@pytest.mark.parametrize("layout", ["empty", "missing", "networks_only", "networks_folder_itself"])
def test_refuses_a_folder_that_is_not_sd_scripts(tmp_path: Path, capsys, layout: str) -> None:
    folder = tmp_path / "d"
    if layout == "empty":
        folder.mkdir()
    elif layout == "networks_only":  # a lone svd_merge_lora.py is not a checkout
        (folder / NETWORKS).mkdir(parents=True)
        (folder / NETWORKS / "svd_merge_lora.py").write_bytes(STANDIN_ORIGINAL)
    elif layout == "networks_folder_itself":
        folder = make_checkout(tmp_path / "sd-scripts") / NETWORKS
    before = snapshot(folder) if folder.is_dir() else None
    for action in ("install", "status", "uninstall"):
        code, out, err = run_patch(capsys, action, "--sd-scripts", str(folder))
        assert code == 2 and out == ""
        assert err.startswith(f"python -m copylora.patch: error: {folder}: ")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert ("no such folder" if layout == "missing" else "not an sd-scripts checkout") in err
    if before is not None:
        assert snapshot(folder) == before


def test_changed_shim_is_refused_without_force(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    target = networks / "svd_merge_lora.py"
    target.write_bytes(target.read_bytes() + b"# someone's edit\n")
    assert status_line(checkout).startswith("modified by someone else:")
    assert "the shim networks/svd_merge_lora.py was changed" in status_line(checkout)
    edited = snapshot(networks)
    for action in ("install", "uninstall"):
        code, _, err = run_patch(capsys, action, "--sd-scripts", str(checkout))
        assert code == 2 and "modified by someone else" in err and "--force" in err
        assert snapshot(networks) == edited
    code, out, _ = run_patch(capsys, "uninstall", "--force", "--sd-scripts", str(checkout))
    assert code == 0 and target.read_bytes() == STANDIN_ORIGINAL
    assert sorted(p.name for p in networks.iterdir()) == ["lora.py", "svd_merge_lora.py"]


def test_changed_kept_original_is_refused_and_force_keeps_it(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    kept = networks / sd_checkout.MERGE_SCRIPT.kept
    changed = STANDIN_ORIGINAL + b"# a local fix\n"
    kept.write_bytes(changed)
    assert "the kept original networks/svd_merge_lora.copylora-original.py was changed" in status_line(checkout)
    assert run_patch(capsys, "install", "--sd-scripts", str(checkout))[0] == 2
    assert run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))[0] == 2
    assert kept.read_bytes() == changed
    assert run_patch(capsys, "install", "--force", "--sd-scripts", str(checkout))[0] == 0
    assert status_line(checkout).startswith("installed:")
    assert kept.read_bytes() == changed  # --force adopts the kept file as it now is
    assert run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))[0] == 0
    assert (networks / "svd_merge_lora.py").read_bytes() == changed


def test_missing_or_broken_sidecar_is_a_modification(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    (networks / sd_checkout.MERGE_SCRIPT.sidecar).write_text("{not json")
    assert "unreadable" in status_line(checkout)
    assert run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))[0] == 2
    (networks / sd_checkout.MERGE_SCRIPT.sidecar).unlink()
    assert "is missing" in status_line(checkout)
    assert run_patch(capsys, "uninstall", "--force", "--sd-scripts", str(checkout))[0] == 0
    assert (networks / "svd_merge_lora.py").read_bytes() == STANDIN_ORIGINAL


def test_target_replaced_after_install(checkout: Path, capsys) -> None:
    """E.g. `git checkout`/an sd-scripts update replaced the shim with a newer stock script."""
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    newer = STANDIN_ORIGINAL + b"# upstream update\n"
    (networks / "svd_merge_lora.py").write_bytes(newer)
    line = status_line(checkout)
    assert line.startswith("not installed:") and "was replaced" in line and "leftover" in line
    # uninstall never puts the old kept copy over the newer script, nor deletes it: it is moved
    # to a name of its own (its hash), and copylora's sidecar goes
    archive = sd_checkout.MERGE_SCRIPT.archive(STANDIN_ORIGINAL)
    code, out, _ = run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))
    assert code == 0 and "removed leftover" in out and archive in out
    assert (networks / "svd_merge_lora.py").read_bytes() == newer
    assert sorted(p.name for p in networks.iterdir()) == sorted(["lora.py", "svd_merge_lora.py", archive])
    assert (networks / archive).read_bytes() == STANDIN_ORIGINAL
    assert archive in status_line(checkout)  # status points at it until the user deletes it
    # install in the same situation keeps the newer script as the original, the older one moved aside
    sd_checkout.install(checkout)
    (networks / "svd_merge_lora.py").write_bytes(newer + b"# again\n")
    code, out, _ = run_patch(capsys, "install", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("installed:") and sd_checkout.MERGE_SCRIPT.archive(newer) in out
    assert (networks / sd_checkout.MERGE_SCRIPT.kept).read_bytes() == newer + b"# again\n"
    assert (networks / sd_checkout.MERGE_SCRIPT.archive(newer)).read_bytes() == newer
    assert status_line(checkout).startswith("installed:")
    assert run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))[0] == 0
    assert (networks / "svd_merge_lora.py").read_bytes() == newer + b"# again\n"


def test_target_replaced_and_kept_changed_is_refused(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    (networks / "svd_merge_lora.py").write_bytes(STANDIN_ORIGINAL + b"# new\n")
    (networks / sd_checkout.MERGE_SCRIPT.kept).write_bytes(STANDIN_ORIGINAL + b"# edited backup\n")
    assert status_line(checkout).startswith("modified by someone else:")
    before = snapshot(networks)
    for action in ("install", "uninstall"):
        assert run_patch(capsys, action, "--sd-scripts", str(checkout))[0] == 2
    assert snapshot(networks) == before
    # --force: install keeps the script in place as the original; uninstall leaves it in place
    assert run_patch(capsys, "install", "--force", "--sd-scripts", str(checkout))[0] == 0
    assert (networks / sd_checkout.MERGE_SCRIPT.kept).read_bytes() == STANDIN_ORIGINAL + b"# new\n"
    assert status_line(checkout).startswith("installed:")


def test_interrupted_install_of_a_replaced_script_is_finished(checkout: Path) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    newer = STANDIN_ORIGINAL + b"# upstream update\n"
    (networks / "svd_merge_lora.py").write_bytes(newer)
    (networks / sd_checkout.MERGE_SCRIPT.kept).write_bytes(newer)  # install got as far as keeping the new original
    assert status_line(checkout).startswith("not installed:")
    sd_checkout.install(checkout)
    assert status_line(checkout).startswith("installed:")
    sd_checkout.uninstall(checkout)
    assert (networks / "svd_merge_lora.py").read_bytes() == newer


def test_shim_without_kept_original_is_refused_even_with_force(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    (networks / sd_checkout.MERGE_SCRIPT.kept).unlink()
    assert "kept original" in status_line(checkout) and "missing" in status_line(checkout)
    for action in ("install", "uninstall"):
        code, _, err = run_patch(capsys, action, "--force", "--sd-scripts", str(checkout))
        assert code == 2 and "git -C" in err and "checkout -- networks/svd_merge_lora.py" in err
    assert shutil.os.path.exists(networks / "svd_merge_lora.py")


def test_interrupted_runs_are_finished(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    before = snapshot(networks)
    # install stopped after keeping the original: a copy beside the untouched target
    shutil.copy2(networks / "svd_merge_lora.py", networks / sd_checkout.MERGE_SCRIPT.kept)
    line = status_line(checkout)
    assert line.startswith("not installed:") and "leftover" in line
    code, out, _ = run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))
    assert code == 0 and "removed leftover" in out and snapshot(networks) == before
    # uninstall stopped after restoring the target and dropping the kept copy: only the sidecar is left
    sd_checkout.install(checkout)
    sidecar = (networks / sd_checkout.MERGE_SCRIPT.sidecar).read_bytes()
    sd_checkout.uninstall(checkout)
    (networks / sd_checkout.MERGE_SCRIPT.sidecar).write_bytes(sidecar)
    assert "leftover" in status_line(checkout)
    assert run_patch(capsys, "install", "--sd-scripts", str(checkout))[0] == 0
    assert status_line(checkout).startswith("installed:")


def test_older_shim_is_updated_without_force(checkout: Path, capsys, monkeypatch, tmp_path: Path) -> None:
    networks = checkout / NETWORKS
    old_shim = tmp_path / "old" / "svd_merge_lora.py"
    old_shim.parent.mkdir()
    old_shim.write_bytes(b"# copylora shim v0\nprint('old')\n")
    with monkeypatch.context() as m:
        m.setattr(sd_checkout, "shim_path", lambda: old_shim)
        sd_checkout.install(checkout)
    assert status_line(checkout).startswith("installed, older shim")
    code, out, _ = run_patch(capsys, "install", "--sd-scripts", str(checkout))
    assert code == 0 and out.startswith("updated the shim")
    assert status_line(checkout).startswith("installed:")
    assert (networks / sd_checkout.MERGE_SCRIPT.kept).read_bytes() == STANDIN_ORIGINAL


def test_writes_are_atomic(checkout: Path, monkeypatch) -> None:
    networks = checkout / NETWORKS
    before = snapshot(networks)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(sd_checkout.os, "replace", boom)
    with pytest.raises(CopyloraError, match="could not write it .disk full.; nothing was written"):
        sd_checkout.install(checkout)
    assert snapshot(networks) == before  # no half-written file, no temp file left
    monkeypatch.undo()
    sd_checkout.install(checkout)
    installed = snapshot(networks)
    monkeypatch.setattr(sd_checkout.os, "replace", boom)
    with pytest.raises(CopyloraError, match="disk full"):
        sd_checkout.uninstall(checkout)
    assert snapshot(networks) == installed


def test_shim_source_is_found_and_marked() -> None:
    path = sd_checkout.shim_path()
    assert path == REPO / "sd_scripts_patch" / "shim.py"
    assert sd_checkout.shim_version(path.read_bytes()) == 2
    assert sd_checkout.shim_version(STANDIN_ORIGINAL) is None
    # an edited shim is still known by the words only the shim uses (its marker line may be gone)
    assert all(word in path.read_bytes() for word in sd_checkout.SHIM_WORDS)
    assert not sd_checkout.is_shim(STANDIN_ORIGINAL) and sd_checkout.is_shim(path.read_bytes().split(b"\n", 1)[1])
    spec = importlib.util.spec_from_file_location("copylora_shim_under_test", path)
    shim_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shim_module)  # importing it (not as __main__) runs nothing
    # the shim (stdlib only, runs under kohya's Python) and the installer agree on every name
    assert shim_module.COMMANDS == {script.stem: script.command for script in sd_checkout.SCRIPTS}
    for script in sd_checkout.SCRIPTS:
        assert shim_module.kept_original_name(script.stem) == script.kept
        assert shim_module.sidecar_name(script.stem) == script.sidecar


def test_both_scripts_install_status_and_uninstall(both: Path, capsys) -> None:
    networks = both / NETWORKS
    before = snapshot(networks)
    code, out, _ = run_patch(capsys, "status", "--sd-scripts", str(both))
    assert code == 1 and out.count("not installed:") == 2

    code, out, _ = run_patch(capsys, "install", "--sd-scripts", str(both))
    assert code == 0, out
    assert "svd_merge_lora.py runs copylora.merge" in out and "resize_lora.py runs copylora.resize" in out
    assert "imports copylora: the patched scripts run it" in out
    shim = sd_checkout.shim_path().read_bytes()
    for script, original in ((sd_checkout.MERGE_SCRIPT, STANDIN_ORIGINAL), (sd_checkout.RESIZE_SCRIPT, STANDIN_RESIZE)):
        assert (networks / script.target).read_bytes() == shim
        assert (networks / script.kept).read_bytes() == original
        assert json.loads((networks / script.sidecar).read_text())["original_sha256"] == sd_checkout.sha256(original)
    code, out, _ = run_patch(capsys, "status", "--sd-scripts", str(both))
    assert code == 0 and out.count("installed:") == 2

    code, out, _ = run_patch(capsys, "uninstall", "--sd-scripts", str(both))
    assert code == 0 and out.count("uninstalled:") == 2
    assert snapshot(networks) == before


def test_status_exit_codes(both: Path, capsys) -> None:
    sd_checkout.install(both, sd_checkout.MERGE_SCRIPT)  # one of two patched
    code, out, _ = run_patch(capsys, "status", "--sd-scripts", str(both))
    assert code == 1 and "installed:" in out and "not installed:" in out
    sd_checkout.install(both, sd_checkout.RESIZE_SCRIPT)
    assert run_patch(capsys, "status", "--sd-scripts", str(both))[0] == 0
    shim = both / NETWORKS / "resize_lora.py"
    shim.write_bytes(shim.read_bytes() + b"# edit\n")
    code, out, _ = run_patch(capsys, "status", "--sd-scripts", str(both))
    assert code == 3 and "modified by someone else: the shim networks/resize_lora.py was changed" in out
    help_text = patch.build_parser().format_help()
    assert "1 a script is not installed" in help_text and "3 modified by someone else" in help_text


def test_a_refused_script_stops_install_before_any_write(both: Path, capsys) -> None:
    networks = both / NETWORKS
    (networks / sd_checkout.RESIZE_SCRIPT.kept).write_bytes(b"someone's file\n")  # kept copy, no sidecar
    before = snapshot(networks)
    code, _, err = run_patch(capsys, "install", "--sd-scripts", str(both))
    assert code == 2 and "resize_lora.py" in err and "--force" in err
    assert snapshot(networks) == before


def python_without_copylora(tmp_path: Path) -> Path:
    """An executable 'kohya Python' that cannot import copylora."""
    wrapper = tmp_path / "kohya venv" / "bin" / "python"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{hide_copylora(tmp_path)}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.skipif(os.name == "nt", reason="the stand-in Python is a POSIX shell script")
def test_install_checks_that_kohyas_python_imports_copylora(both: Path, tmp_path: Path, capsys) -> None:
    python = python_without_copylora(tmp_path)
    code, out, err = run_patch(capsys, "install", "--sd-scripts", str(both), "--python", str(python))
    assert code == 1
    assert out.count("installed:") == 2  # the patch is in place: the shims fall back to the originals
    line = err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"{python} cannot import copylora (ModuleNotFoundError" in line
    assert line.endswith(f'"{python}" -m pip install --no-build-isolation "{REPO}"')
    # the venv kohya's install makes is found without --python
    venv = both / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(python)
    code, _, err = run_patch(capsys, "install", "--sd-scripts", str(both))
    assert code == 1 and f'"{venv / "python"}" -m pip install' in err


# ---------------------------------------------------------------- running the patched script


def test_resize_shim_hands_argv_to_copylora_resize(both: Path, tmp_path: Path) -> None:
    sd_checkout.install_all(both)
    out = tmp_path / "out.safetensors"
    args = ["--model", "in.safetensors", "--new_rank", "4", "--save_to", str(out), "--exit_code", "4"]
    proc = run_script(both, "networks/resize_lora.py", args, [fake_copylora(tmp_path)])
    assert proc.returncode == 4 and proc.stderr == ""
    record = json.loads(Path(str(out) + ".copylora.json").read_text())
    assert record["module"] == "copylora.resize" and record["argv"] == args
    # without copylora, the kept resize_lora.py runs, after one warning line naming copylora.resize
    proc = run_script(both, "networks/resize_lora.py", ["--save_to", str(out)], [hide_copylora(tmp_path), both])
    assert proc.returncode == 0 and proc.stderr.startswith("copylora: copylora.resize is not importable")
    original_run = json.loads(Path(str(out) + ".original.json").read_text())
    assert Path(original_run["file"]).name == "resize_lora.py"


def test_shim_hands_argv_and_exit_code_to_copylora_merge(checkout: Path, tmp_path: Path) -> None:
    sd_checkout.install(checkout)
    fake = fake_copylora(tmp_path)
    out = tmp_path / "out.safetensors"
    args = ["--save_precision", "fp16", "--models", "b c.safetensors", "a.safetensors", "--ratios", "1", "-1",
            "--new_conv_rank=8", "--save_to", str(out), "--exit_code", "5"]
    proc = run_script(checkout, "networks/svd_merge_lora.py", args, [fake])
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr == ""
    record = json.loads(Path(str(out) + ".copylora.json").read_text())
    assert record["argv"] == args
    # networks/ (kohya's lora.py & co.) is kept off sys.path while copylora is imported
    assert str(checkout / NETWORKS) not in record["sys_path"]
    assert not Path(str(out) + ".original.json").exists()


def test_fallback_runs_the_kept_original_when_copylora_is_hidden(checkout: Path, tmp_path: Path) -> None:
    sd_checkout.install(checkout)
    out = tmp_path / "out.safetensors"
    args = ["--models", "x.safetensors", "--save_to", str(out), "--exit_code", "3"]
    # library/ comes from the checkout root the way kohya's `pip install -e .` makes it importable
    proc = run_script(checkout, "networks/svd_merge_lora.py", args, [hide_copylora(tmp_path), checkout])
    assert proc.returncode == 3
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1, proc.stderr
    assert warning[0].startswith(f"copylora: copylora.merge is not importable by {sys.executable}")
    assert "pip install --no-build-isolation" in warning[0] and str(REPO) in warning[0]
    record = json.loads(Path(str(out) + ".original.json").read_text())
    assert record["name"] == "__main__"
    assert record["argv"] == ["networks/svd_merge_lora.py", *args]
    assert Path(record["file"]).resolve() == (checkout / NETWORKS / "svd_merge_lora.py").resolve()
    assert record["lora"] == "networks.lora" and record["util"] == "library.standin_util"
    assert Path(record["sys_path0"]).resolve() == (checkout / NETWORKS).resolve()


def test_fallback_passes_a_crash_through(checkout: Path, tmp_path: Path) -> None:
    sd_checkout.install(checkout)
    out = tmp_path / "out.safetensors"
    proc = run_script(checkout, "networks/svd_merge_lora.py", ["--save_to", str(out), "--crash"],
                      [hide_copylora(tmp_path), checkout])
    assert proc.returncode == 1 and "RuntimeError: stand-in crashed" in proc.stderr
    assert "svd_merge_lora.copylora-original.py" in proc.stderr  # the traceback points at the real lines


def test_copylora_use_original_runs_the_original_quietly(checkout: Path, tmp_path: Path) -> None:
    sd_checkout.install(checkout)
    out = tmp_path / "out.safetensors"
    proc = run_script(checkout, "networks/svd_merge_lora.py", ["--save_to", str(out)],
                      [fake_copylora(tmp_path), checkout], COPYLORA_USE_ORIGINAL="1")
    assert proc.returncode == 0 and proc.stderr == ""
    assert Path(str(out) + ".original.json").exists() and not Path(str(out) + ".copylora.json").exists()


def test_after_uninstall_the_stock_script_runs_again(gui_root: Path, tmp_path: Path) -> None:
    root = gui_root / "sd-scripts"
    sd_checkout.install(sd_checkout.find_checkout(gui_root))
    sd_checkout.uninstall(sd_checkout.find_checkout(gui_root))
    out = tmp_path / "out.safetensors"
    # Kohya's GUI runs it from its own root: python sd-scripts/networks/svd_merge_lora.py ...
    proc = run_script(gui_root, "sd-scripts/networks/svd_merge_lora.py", ["--save_to", str(out)],
                      [fake_copylora(tmp_path), root])
    assert proc.returncode == 0, proc.stderr
    assert Path(str(out) + ".original.json").exists() and not Path(str(out) + ".copylora.json").exists()


# ---------------------------------------------------------------- end to end with copylora's merge


def write_lora(path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    modules = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 24),
        "lora_unet_mid_block_attentions_0_proj_out": (40, 40),
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn1_to_q": (48, 32),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 16),
    }
    tensors = {}
    for name, (out_f, in_f) in modules.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(8, in_f, generator=g) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_f, 8, generator=g) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4.0",
            "ss_v2": "False", "ss_base_model_version": "sd_v1"}
    save_file(tensors, str(path), metadata=meta)


def load_output(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}
        meta = f.metadata() or {}
    return tensors, {k: v for k, v in meta.items() if k.startswith("ss_") or k.startswith("sshs_")}


@pytest.mark.parametrize("layout", ["sd-scripts", "kohya-gui"])
def test_patched_script_writes_what_copylora_merge_writes(tmp_path: Path, layout: str) -> None:
    if layout == "sd-scripts":
        cwd = make_checkout(tmp_path / "sd-scripts")
        script = "networks/svd_merge_lora.py"
    else:
        cwd = tmp_path / "kohya_ss"
        make_checkout(cwd / "sd-scripts")
        script = "sd-scripts/networks/svd_merge_lora.py"
    sd_checkout.install(sd_checkout.find_checkout(cwd))
    write_lora(tmp_path / "A.safetensors", 1)
    write_lora(tmp_path / "B.safetensors", 2)
    stock_flags = ["--models", str(tmp_path / "B.safetensors"), str(tmp_path / "A.safetensors"),
                   "--ratios", "1", "-1", "--new_rank", "4", "--save_precision", "fp16", "--device", "cpu"]
    shim_out, direct_out = tmp_path / "shim.safetensors", tmp_path / "direct.safetensors"

    proc = run_script(cwd, script, [*stock_flags, "--save_to", str(shim_out)], [REPO])
    assert proc.returncode == 0, proc.stderr
    assert "not importable" not in proc.stderr
    direct = subprocess.run([sys.executable, "-m", "copylora.merge", *stock_flags, "--save_to", str(direct_out)],
                            cwd=tmp_path, env=env_with([REPO]), capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr

    shim_tensors, shim_meta = load_output(shim_out)
    direct_tensors, direct_meta = load_output(direct_out)
    assert shim_tensors.keys() == direct_tensors.keys() and len(shim_tensors) > 0
    assert shim_tensors == direct_tensors
    assert shim_meta == direct_meta and "ss_network_dim" in shim_meta

    # a bad flag is refused the way copylora.merge refuses it: exit code 2, no traceback
    bad_args = [*stock_flags, "--save_to", str(tmp_path / "x.safetensors"), "--no_such_flag"]
    bad = run_script(cwd, script, bad_args, [REPO])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_patched_resize_writes_what_copylora_resize_writes(both: Path, tmp_path: Path) -> None:
    sd_checkout.install_all(both)
    write_lora(tmp_path / "A.safetensors", 1)
    flags = ["--model", str(tmp_path / "A.safetensors"), "--new_rank", "2", "--save_precision", "fp16"]
    shim_out, direct_out = tmp_path / "shim.safetensors", tmp_path / "direct.safetensors"
    proc = run_script(both, "networks/resize_lora.py", [*flags, "--save_to", str(shim_out)], [REPO])
    assert proc.returncode == 0 and "not importable" not in proc.stderr, proc.stderr
    direct = subprocess.run([sys.executable, "-m", "copylora.resize", *flags, "--save_to", str(direct_out)],
                            cwd=tmp_path, env=env_with([REPO]), capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr
    assert load_output(shim_out) == load_output(direct_out) and len(load_output(shim_out)[0]) > 0


# ---------------------------------------------------------------- a real sd-scripts checkout (opt-in)


def stock_flags(script: Path) -> list[str]:
    """Every --flag a stock script defines, read from its source with ast."""
    flags = []
    for node in ast.walk(ast.parse(script.read_bytes())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags += [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    return flags


@pytest.mark.kohya
def test_real_checkout_accepts_every_stock_flag(tmp_path: Path) -> None:
    real = os.environ.get("COPYLORA_SD_SCRIPTS")
    if not real:
        pytest.skip("set COPYLORA_SD_SCRIPTS to an sd-scripts checkout")
    root = tmp_path / "sd-scripts"
    shutil.copytree(real, root, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    sd_checkout.uninstall_all(root, force=True)  # the given checkout may be patched already
    originals = {s.target: (root / NETWORKS / s.target).read_bytes() for s in sd_checkout.SCRIPTS}
    assert all(sd_checkout.shim_version(data) is None for data in originals.values())
    sd_checkout.install_all(root)
    write_lora(tmp_path / "A.safetensors", 1)
    write_lora(tmp_path / "B.safetensors", 2)
    out = str(tmp_path / "out.safetensors")
    values = {
        sd_checkout.MERGE_SCRIPT: {
            "--save_precision": ["fp16"], "--precision": ["float"], "--save_to": [out],
            "--models": [str(tmp_path / "B.safetensors"), str(tmp_path / "A.safetensors")], "--ratios": ["1", "-1"],
            "--lbws": ["[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]", "[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]"],
            "--new_rank": ["4"], "--new_conv_rank": ["4"], "--device": ["cpu"], "--no_metadata": [],
        },
        sd_checkout.RESIZE_SCRIPT: {
            "--save_precision": ["fp16"], "--new_rank": ["4"], "--new_conv_rank": ["2"], "--save_to": [out],
            "--model": [str(tmp_path / "A.safetensors")], "--device": ["cpu"], "--verbose": [],
            "--dynamic_method": ["sv_fro"], "--dynamic_param": ["0.9"],
        },
    }
    for script, known in values.items():
        flags = stock_flags(root / NETWORKS / script.kept)
        unknown = [f for f in flags if f not in known]
        assert not unknown, f"stock {script.target} has flags this test does not know: {unknown}"
        argv = [x for f in flags for x in (f, *known[f])]
        proc = run_script(root, f"networks/{script.target}", argv, [REPO])
        assert proc.returncode == 0 and "not importable" not in proc.stderr, proc.stderr
        assert Path(out).is_file()
        Path(out).unlink()
    sd_checkout.uninstall_all(root)
    assert {t: (root / NETWORKS / t).read_bytes() for t in originals} == originals


# ---------------------------------------------------------------- issue 19: the original is never lost

FIRST_LINE_EDITS = {
    "bom": lambda shim: b"\xef\xbb\xbf" + shim,
    "shebang": lambda shim: b"#!/usr/bin/env python\n" + shim,
    "encoding-line": lambda shim: b"# -*- coding: utf-8 -*-\n" + shim,
    "marker-deleted": lambda shim: shim.split(b"\n", 1)[1],
}


@pytest.mark.parametrize("edit", FIRST_LINE_EDITS, ids=list(FIRST_LINE_EDITS))
def test_a_shim_edited_at_its_first_line_is_still_the_shim(checkout: Path, capsys, edit: str) -> None:
    """An editor's BOM, a shebang, an encoding line, the marker deleted: `status` used to call the
    shim a replaced script; `uninstall` then deleted the kept original, `install` kept the edited
    shim as the new "original"."""
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    target = networks / "svd_merge_lora.py"
    target.write_bytes(FIRST_LINE_EDITS[edit](target.read_bytes()))
    assert "modified by someone else: the shim networks/svd_merge_lora.py was changed" in status_line(checkout)
    edited = snapshot(networks)
    for action in ("install", "uninstall"):
        code, _, err = run_patch(capsys, action, "--sd-scripts", str(checkout))
        assert code == 2 and "--force" in err
        assert snapshot(networks) == edited
    code, _, _ = run_patch(capsys, "install", "--force", "--sd-scripts", str(checkout))
    assert code in (0, 1) and status_line(checkout).startswith("installed:")
    assert (networks / sd_checkout.MERGE_SCRIPT.kept).read_bytes() == STANDIN_ORIGINAL
    target.write_bytes(FIRST_LINE_EDITS[edit](target.read_bytes()))
    assert run_patch(capsys, "uninstall", "--force", "--sd-scripts", str(checkout))[0] == 0
    assert target.read_bytes() == STANDIN_ORIGINAL
    assert sorted(p.name for p in networks.iterdir()) == ["lora.py", "svd_merge_lora.py"]


def test_uninstall_restores_the_recorded_mode(checkout: Path) -> None:
    """It used to take the kept copy's mode as it was at uninstall time."""
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    (networks / sd_checkout.MERGE_SCRIPT.kept).chmod(0o600)
    sd_checkout.uninstall(checkout)
    assert stat.S_IMODE((networks / "svd_merge_lora.py").stat().st_mode) == 0o755


def _chattr(path: Path, flag: str) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="chattr +i needs root")
def test_an_immutable_kept_original_is_one_line(checkout: Path, capsys) -> None:
    networks = checkout / NETWORKS
    sd_checkout.install(checkout)
    kept = networks / sd_checkout.MERGE_SCRIPT.kept
    if not _chattr(kept, "+i"):
        pytest.skip(f"this file system does not take chattr +i ({kept})")
    try:
        code, _, err = run_patch(capsys, "uninstall", "--sd-scripts", str(checkout))
    finally:
        _chattr(kept, "-i")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "Operation not permitted" in err and str(kept) in err
    assert (networks / "svd_merge_lora.py").read_bytes() == STANDIN_ORIGINAL  # restored before the unlink failed
    assert "leftover" in status_line(checkout)


def test_install_and_uninstall_racing_never_lose_the_original(checkout: Path) -> None:
    """Uninstall racing install lost the kept original in 1 of 200 in-process races: now one patch
    command at a time holds networks/."""
    import threading

    networks = checkout / NETWORKS
    for _ in range(60):
        errors: list[BaseException] = []

        def run(action) -> None:
            try:
                action(checkout, force=True)
            except CopyloraError:
                pass  # a refusal is fine; losing bytes is not
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(a,)) for a in (sd_checkout.install_all, sd_checkout.uninstall_all)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert any(p.read_bytes() == STANDIN_ORIGINAL for p in networks.iterdir() if p.is_file())
        assert not [p for p in networks.iterdir() if p.name.endswith(".tmp")]
