"""`copylora gui` without a browser: the install hint, the safety rules, the settings file, and the page's
API driven by gradio_client (the merge through /merge equals the CLI's, tensor for tensor)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from copylora import gui
from copylora.errors import CopyloraError
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.merge import main as merge_main
from copylora.webui import settings as gui_settings
from copylora.webui.i18n import LANGUAGES, TEXTS, Texts, system_language
from copylora.webui.launcher import write_launcher
from tests.kohya_tool_fakes import add_tools
from tests.test_train_fakes import PYTHON, FakeKohya, read_log

LAYOUT = [
    ModuleShape("lora_unet_down_blocks_1_attentions_0_proj_in", 24, 24, (1, 1)),
    ModuleShape("lora_unet_down_blocks_1_resnets_0_conv1", 20, 12, (3, 3)),
    ModuleShape("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 32, 40),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 48, 16),
]


def lora_pair(folder: Path) -> tuple[Path, Path]:
    """LoRA B and LoRA A, rank 8, small."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "B.safetensors", folder / "A.safetensors"
    for seed, path in enumerate(paths):
        save_file(random_lora(LAYOUT, 8, 4.0, seed + 1), str(path))
    return paths


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_without_gradio_it_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert gui.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith('pip install "copylora[gui]"')


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "myhost.local"])
def test_other_machines_need_a_password(host, capsys):
    assert gui.main(["--host", host]) == 2
    assert f"--host {host}: other machines could use the page" in capsys.readouterr().err
    assert gui.credentials(host, "me:secret") == ("me", "secret")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_this_machine_needs_no_password(host):
    assert gui.credentials(host, None) is None


@pytest.mark.parametrize("auth", ["me", "me:", ":secret"])
def test_a_half_given_password_is_refused(auth):
    with pytest.raises(CopyloraError, match="--auth: give USER:PASS"):
        gui.credentials("127.0.0.1", auth)


def test_settings_round_trip_in_the_users_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert gui_settings.load() == gui_settings.Settings()
    wanted = gui_settings.Settings(sd_scripts="/opt/sd-scripts", python="", output_dir=str(tmp_path / "out"),
                                   language="ja")
    path = gui_settings.save(wanted)
    assert path == tmp_path / "config" / "copylora" / "gui.json"
    assert gui_settings.load() == wanted
    path.write_text("{not json")
    with pytest.raises(CopyloraError, match=f"{path}: not a readable settings file"):
        gui_settings.load()


def test_every_text_has_both_languages():
    for key, texts in TEXTS.items():
        assert len(texts) == len(LANGUAGES) and all(text.strip() for text in texts), key
    assert Texts("ja")("tab_copy_machine") == "コピー機"


@pytest.mark.parametrize(("lang", "expected"), [("ja_JP.UTF-8", "ja"), ("en_US.UTF-8", "en"), ("C", "en")])
def test_language_follows_the_locale(monkeypatch, lang, expected):
    for name in ("LC_ALL", "LC_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", lang)
    assert system_language() == expected


# ---------------------------------------------------------------- the page's API, through gradio_client


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The page (English), served in this process on a free port; its URL and output folder."""
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
    from copylora.webui.app import build_app, serve
    from copylora.webui.page import Page

    root = tmp_path_factory.mktemp("gui")
    with pytest.MonkeyPatch.context() as patch:
        kohya = FakeKohya(root, patch)  # the Preview tab's kohya: stand-in gen_img.py
        add_tools(kohya.sd_scripts)
        settings = gui_settings.Settings(sd_scripts=str(kohya.sd_scripts), python=PYTHON, output_dir=str(root / "out"))
        patch.setenv("GRADIO_TEMP_DIR", str(settings.uploads_path))
        patch.setenv("XDG_CONFIG_HOME", str(root / "config"))
        page = Page(Texts("en"), settings)
        app = build_app(page)
        url = serve(app, page, "127.0.0.1", free_port(), None, open_browser=False, block=False)
        try:
            yield url, page.output_dir, root, kohya
        finally:
            app.close()


def assert_same_as_cli_merge(saved: Path, models: list[Path], cli_out: Path, *flags: str) -> None:
    """`saved` holds, tensor for tensor and dtype for dtype, what `copylora merge` writes for these models
    with ratios 1 -1, rank 16, fp16, the exact difference and `flags`."""
    assert merge_main(["--models", *map(str, models), "--ratios", "1", "-1", "--new_rank", "16", "--save_precision",
                       "fp16", "--clamp_quantile", "1", *flags, "--save_to", str(cli_out), "--quiet"]) == 0
    ours, theirs = load_file(str(saved)), load_file(str(cli_out))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_merge_through_the_api_equals_the_cli(served):
    from gradio_client import Client, handle_file

    url, output_dir, root, _ = served
    b, a = lora_pair(root / "inputs")
    client = Client(url, verbose=False)
    summary, totals, table, spectrum, download = client.predict(
        models=[handle_file(str(b)), handle_file(str(a))], ratios="1 -1", new_rank=16, save_precision="fp16",
        clamp_quantile=1.0, save_to="api_diff.safetensors", api_name="/merge",
    )
    saved = output_dir / "api_diff.safetensors"
    assert summary.startswith("merged 4 modules") and summary.endswith(totals) and str(saved) in summary
    assert totals.startswith("fidelity vs exact delta: retained ") and "clamp loss 0.00%" in totals
    assert "total" in table and Path(spectrum).is_file() and Path(download).read_bytes() == saved.read_bytes()

    assert_same_as_cli_merge(saved, [b, a], root / "cli_diff.safetensors")


def test_bad_input_through_the_api_is_the_cli_line_and_writes_nothing(served):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    url, output_dir, root, _ = served
    b, _ = lora_pair(root / "inputs")
    with pytest.raises(AppError) as caught:
        Client(url, verbose=False).predict(models=[handle_file(str(b))], ratios="1 -1",
                                           save_to="never.safetensors", api_name="/merge")
    assert str(caught.value) == "copylora.merge: error: --ratios: 2 values for 1 models; give one ratio per model"
    assert not (output_dir / "never.safetensors").exists()


def test_resize_and_inspect_through_the_api(served):
    from gradio_client import Client, handle_file

    url, output_dir, root, _ = served
    b, _ = lora_pair(root / "inputs")
    client = Client(url, verbose=False)
    summary, retention, download = client.predict(
        model=handle_file(str(b)), new_rank=4, save_precision="fp16", save_to="api_small.safetensors",
        api_name="/resize",
    )
    small = output_dir / "api_small.safetensors"
    assert str(small) in summary and retention.count(": rank 4, alpha") == len(LAYOUT)
    client.predict(model=handle_file(str(b)), new_rank=8, dynamic_method="sv_fro", dynamic_param=0.9,
                   uniform_alpha=True, save_to="api_uniform.safetensors", api_name="/resize")
    alphas = {float(v) for k, v in load_file(str(output_dir / "api_uniform.safetensors")).items() if k.endswith(".alpha")}
    assert len(alphas) == 1  # --uniform_alpha: one alpha for every module
    assert Path(download).read_bytes() == small.read_bytes()

    table, totals, spectrum = client.predict(lora=handle_file(str(small)), against=[handle_file(str(b))],
                                             ratios="1", api_name="/inspect")
    assert table.splitlines()[0].split()[:3] == ["block", "modules", "rank"] and "total" in table
    assert totals.startswith("fidelity vs exact delta: retained ") and Path(spectrum).is_file()


def test_preview_through_the_api_runs_kohyas_gen_img(served):
    from gradio_client import Client, handle_file

    url, output_dir, root, kohya = served
    b, _ = lora_pair(root / "inputs")
    grid, summary = Client(url, verbose=False).predict(
        base=str(kohya.base), loras=[handle_file(str(b))], strengths="0 1", seeds="7", width=16, height=24,
        prompt="a cat\n\na dog --n blurry\n", api_name="/preview",
    )
    runs = [run for run in read_log(kohya.log) if run["script"] == "gen_img.py"]
    assert [(cell["prompt"], cell["am"], cell["seed"]) for cell in runs[-1]["cells"]] == [
        ("a cat", 0.0, 7), ("a cat", 1.0, 7), ("a dog", 0.0, 7), ("a dog", 1.0, 7)]  # a prompt per line
    assert Path(grid).is_file() and str(output_dir / "B_preview") in summary


def test_settings_refuse_a_folder_that_is_no_checkout(served):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _, root, kohya = served
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as caught:
        client.predict(sd_scripts=str(root / "nowhere"), python="", output_dir="", language="en", api_name="/settings")
    assert str(caught.value) == (f"copylora.gui: error: {root / 'nowhere'}: no such folder (pass an sd-scripts "
                                 "checkout or a Kohya's GUI folder)")
    assert not gui_settings.settings_path().exists()
    found, saved = client.predict(sd_scripts=str(kohya.sd_scripts), python=PYTHON, output_dir="", language="ja",
                                  api_name="/settings")
    assert found == f"sd-scripts: {kohya.sd_scripts}; kohya's Python: {PYTHON}"
    assert gui_settings.load().language == "ja" and str(gui_settings.settings_path()) in saved


# ---------------------------------------------------------------- the double-click launcher


def test_write_launcher_sh_starts_this_python_and_passes_options(tmp_path, capsys):
    assert gui.main(["--write-launcher", str(tmp_path / "here"), "--lang", "ja", "--port", "7999"]) == 0
    path = tmp_path / "here" / "copylora-gui.sh"
    assert capsys.readouterr().out.strip() == str(path)
    assert path.read_text().splitlines()[-1] == (
        f'exec {sys.executable} -m copylora.gui --inbrowser --port 7999 --lang ja "$@"')
    assert os.access(path, os.X_OK)
    # the launcher runs: --help through it shows copylora gui's usage
    done = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--write-launcher DIR" in done.stdout
    assert gui.main(["--write-launcher", str(tmp_path / "here")]) == 2  # never replaced
    assert f"{path}: already exists" in capsys.readouterr().err


def test_write_launcher_bat_for_windows(tmp_path):
    python = r"C:\Users\名前\kohya_ss\venv\Scripts\python.exe"
    path = write_launcher(tmp_path, ["--lang", "ja"], windows=True, python=python)
    assert path.name == "copylora-gui.bat"
    lines = path.read_bytes().decode("utf-8").split("\r\n")
    assert lines[:2] == ["@echo off", "chcp 65001 > nul"]
    assert f"{python} -m copylora.gui --inbrowser --lang ja %*" in lines and "if errorlevel 1 pause" in lines


def test_a_password_is_never_written_into_a_launcher(tmp_path, capsys):
    assert gui.main(["--write-launcher", str(tmp_path), "--auth", "me:secret"]) == 2
    assert "a password does not belong in a launcher file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_files_are_served_from_the_output_folder_only(served):
    import urllib.error
    import urllib.request

    url, output_dir, root, _ = served
    inside, outside = output_dir / "shown.txt", root / "private.txt"
    output_dir.mkdir(parents=True, exist_ok=True)
    inside.write_text("shown")
    outside.write_text("private")
    assert urllib.request.urlopen(f"{url}gradio_api/file={inside}").read() == b"shown"
    for path in (outside, Path(__file__)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}gradio_api/file={path}")
        assert refused.value.code == 403


# ---------------------------------------------------------------- what the page works out for itself


def test_sdxl_is_read_off_the_base_model(tmp_path):
    pytest.importorskip("gradio")
    from copylora.webui.copy_machine_tab import detected_sdxl

    def checkpoint(name: str, keys: list[str]) -> str:
        save_file({key: torch.zeros(1) for key in keys}, str(tmp_path / name))
        return str(tmp_path / name)

    assert detected_sdxl(checkpoint("xl.safetensors", ["conditioner.embedders.1.model.ln_final.weight",
                                                       "model.diffusion_model.out.0.weight"])) is True
    assert detected_sdxl(checkpoint("sd15.safetensors", ["cond_stage_model.transformer.x.weight",
                                                         "model.diffusion_model.out.0.weight"])) is False
    assert detected_sdxl(checkpoint("lora.safetensors", ["lora_unet_x.lora_down.weight"])) is None  # cannot tell
    assert detected_sdxl(str(tmp_path / "missing.safetensors")) is None and detected_sdxl("") is None
    diffusers = tmp_path / "diffusers"
    (diffusers / "text_encoder_2").mkdir(parents=True)
    (diffusers / "model_index.json").write_text("{}")
    assert detected_sdxl(str(diffusers)) is True


def test_slider_values_follow_the_ratios_field():
    pytest.importorskip("gradio")
    from copylora.webui.merge_tab import slider_values

    assert slider_values("1 -1", 2) == [1.0, -1.0]
    assert slider_values("0.5", 3) == [0.5, -1.0, 0.0]  # B − A's defaults where the field has fewer
    assert slider_values("3 -2.5", 2) == [2.0, -2.0]  # a slider's range; the field keeps what was typed
    assert slider_values("1 x", 2) == [1.0, -1.0]


def test_copy_machine_through_the_api(served, monkeypatch):
    """The stand-in kohya trains A and B; a kohya failure comes back as copy-machine's one line."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from PIL import Image

    url, output_dir, root, kohya = served
    before, after = root / "before.png", root / "after.png"
    Image.new("RGB", (24, 36), (200, 30, 30)).save(before)
    Image.new("RGB", (24, 36), (90, 90, 90)).save(after)
    client = Client(url, verbose=False)
    status, log, picture, fidelity, report, download = client.predict(
        base=str(kohya.base), before=handle_file(str(before)), after=handle_file(str(after)), new_rank=16,
        clamp_quantile=1, output="api_edit.safetensors", api_name="/copy_machine",
    )
    saved = output_dir / "api_edit.safetensors"
    assert "finished" in status and log.splitlines()[-1] == str(saved)
    assert fidelity.startswith("fidelity vs exact delta: retained 100.00% of energy") and "total" in fidelity
    assert Path(picture).is_file() and "# copy-machine LoRA" in report
    assert Path(download).read_bytes() == saved.read_bytes()

    monkeypatch.setenv("FAKE_KOHYA_EXIT", "7")  # a new output name: a new work folder, so kohya runs again
    with pytest.raises(AppError) as caught:
        client.predict(base=str(kohya.base), before=handle_file(str(before)), after=handle_file(str(after)),
                       output="failing.safetensors", api_name="/copy_machine")
    assert str(caught.value) == ("copylora.copy_machine: error: LoRA A: kohya's train_network.py exited with code 7 "
                                 "(its output is above); rerun to resume")
    assert not (output_dir / "failing.safetensors").exists()


def test_copy_machines_work_folder_and_bake_options_through_the_api(served):
    """work_dir (a bare name: in the output folder), bake_precision and delete_merged_base reach
    copy-machine as --work-dir, --bake-precision and --delete-merged-base (method merged-base)."""
    from gradio_client import Client, handle_file
    from PIL import Image

    url, output_dir, root, kohya = served
    before, after = root / "before_bake.png", root / "after_bake.png"
    Image.new("RGB", (24, 36), (30, 200, 30)).save(before)
    Image.new("RGB", (24, 36), (120, 120, 120)).save(after)
    status, *_ = Client(url, verbose=False).predict(
        base=str(kohya.base), before=handle_file(str(before)), after=handle_file(str(after)), method="merged-base",
        output="baked_edit.safetensors", work_dir="my work", bake_precision="bf16", delete_merged_base=True,
        api_name="/copy_machine",
    )
    work = output_dir / "my work"
    assert "finished" in status and (work / "A.safetensors").is_file() and (work / "B.safetensors").is_file()
    bakes = [record for record in read_log(kohya.log) if "sd_model" in record]
    assert bakes and bakes[-1]["save_precision"] == "bf16" and Path(bakes[-1]["save_to"]).parent == work
    assert not Path(bakes[-1]["save_to"]).exists()  # deleted once B was trained


def test_a_run_ends_with_the_gui(tmp_path, monkeypatch):
    """The run's own process group misses the terminal's Ctrl-C: when the GUI's process exits, it ends it."""
    from tests.test_gui_browser import Kohya, alive

    kohya = Kohya(tmp_path, monkeypatch)
    kohya.slow_flag.touch()  # LoRA B trains for 15 s
    argv = ["--sd-scripts", str(kohya.sd_scripts), "--python", PYTHON, "--base", str(kohya.base), "--before",
            str(kohya.before), "--after", str(kohya.after), "--output", str(tmp_path / "out" / "edit.safetensors")]
    gui_process = (
        "import sys, time\n"
        "from copylora.webui.copy_machine_run import CopyMachineProcess\n"
        f"run = CopyMachineProcess({argv!r})\n"
        "lines = []\n"
        "while not any('LoRA B: training' in line for line in lines):\n"
        "    lines += run.lines(0.5)[0]\n"
        "time.sleep(1)\n"
    )
    subprocess.run([sys.executable, "-c", gui_process], timeout=120, check=True)
    pids = [int(p.name) for p in kohya.pids.iterdir()]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)  # A finished; B's kohya ended with the GUI


def test_progress_is_read_from_the_runs_output():
    from copylora.webui.copy_machine_run import Progress

    progress = Progress()
    progress.feed("python -m copylora.copy_machine: LoRA A: reusing /w/A.safetensors: images and config unchanged")
    assert progress.step == "step_reuse_a" and progress.counter is None
    progress.feed("copylora copy-machine: LoRA B: training with kohya's train_network.py (config /w/B.toml)")
    progress.feed("epoch 1/800")  # kohya's epoch line is not the step counter
    assert progress.step == "step_train_b" and progress.counter is None
    for done in (1479, 1480):  # kohya's bar, redrawn in place: one line in the log
        progress.feed(f"steps:  37%|███▋      | {done}/4000 [12:34<21:23,  1.96it/s, avr_loss=0.0812]")
    assert progress.counter == (1480, 4000) and progress.remaining == "21:23"
    assert sum("/4000 [" in line for line in progress.lines) == 1
    progress.feed("copylora copy-machine: merging B - A into /out/edit.safetensors")
    progress.feed("merging: 100%|██████████| 2/2 [00:00<00:00, 66052.03module/s]")  # the merge's bar: not kohya's
    assert progress.step == "step_merge" and progress.counter is None
    progress.feed("merged 2 modules (rank 16: 2) with backend ext (C++ CPU) in 0.03 s (engine 0.008 s) -> /out/e."
                  "safetensors; fidelity vs exact delta: retained 100.00% of energy, clamp loss 0.00%")
    progress.feed("copylora copy-machine: report: /out/edit.report.md")
    assert progress.fidelity == "fidelity vs exact delta: retained 100.00% of energy, clamp loss 0.00%"
    assert progress.report == Path("/out/edit.report.md") and progress.errors == []
    progress.feed("copylora copy-machine: error: LoRA B: kohya's train_network.py exited with code 7")
    assert progress.errors == ["copylora copy-machine: error: LoRA B: kohya's train_network.py exited with code 7"]


def test_an_unclosed_quote_is_one_line():
    pytest.importorskip("gradio")
    from copylora.webui.cli_calls import words

    with pytest.raises(CopyloraError, match="'--seeds \"1': No closing quotation"):
        words('--seeds "1')


def test_the_commands_other_options_reach_them_through_the_api(served):
    """--split_sv, --backend (merge, resize, inspect) and inspect's --clamp_quantile, named as the flags."""
    from gradio_client import Client, handle_file

    url, output_dir, root, _ = served
    b, a = lora_pair(root / "inputs")
    client = Client(url, verbose=False)
    summary, *_ = client.predict(
        models=[handle_file(str(b)), handle_file(str(a))], ratios="1 -1", new_rank=16, save_precision="fp16",
        clamp_quantile=1.0, save_to="api_split.safetensors", split_sv=True, backend="torch", api_name="/merge",
    )
    assert "with backend torch" in summary
    assert_same_as_cli_merge(output_dir / "api_split.safetensors", [b, a], root / "cli_split.safetensors",
                             "--split_sv", "--backend", "torch")

    summary, _, _ = client.predict(model=handle_file(str(b)), new_rank=4, save_to="api_torch.safetensors",
                                   backend="torch", api_name="/resize")
    assert "with backend torch" in summary
    _, totals, _ = client.predict(lora=handle_file(str(output_dir / "api_split.safetensors")),
                                  against=[handle_file(str(b)), handle_file(str(a))], ratios="1 -1",
                                  clamp_quantile=1.0, backend="torch", api_name="/inspect")
    assert totals.startswith("fidelity vs exact delta: retained ") and "clamp loss 0.00%" in totals
