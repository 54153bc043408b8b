"""Copy machine: `copylora copy-machine` from two images to the difference LoRA, with its progress
streamed, Stop, and the results (picture, fidelity, per-block table, report, download) at the end."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from safetensors import SafetensorError, safe_open

from copylora import copy_machine
from copylora.errors import CopyloraError
from copylora.kohya import bake as kohya_bake
from copylora.kohya.options import PRESETS_DIR
from copylora.webui.cli_calls import in_output_folder, optional, parse, shows_errors
from copylora.webui.copy_machine_run import CopyMachineProcess, Progress
from copylora.webui.inspect_tab import measure
from copylora.webui.merge_tab import dynamic_choices
from copylora.webui.page import Page

POLL_SECONDS = 0.5
Results = tuple[str, str, str | None, str, str, str | None]  # status, log, picture, fidelity+table, report, file


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def kohya_sets(max_train_epochs: int, max_train_steps: int, network_dim: int, learning_rate: float,
               resolution: str) -> list[str]:
    """The knobs people change, as --set overrides of the preset (0 or empty: the preset's value)."""
    sets = []
    if max_train_steps:  # kohya lets epochs override steps: a step count replaces the preset's epochs
        sets += ["max_train_epochs=", f"max_train_steps={int(max_train_steps)}"]
    elif max_train_epochs:
        sets.append(f"max_train_epochs={int(max_train_epochs)}")
    if network_dim:
        sets.append(f"network_dim={int(network_dim)}")
    if learning_rate:
        sets.append(f"learning_rate={learning_rate:g}")
    if resolution:
        sets.append(f'resolution="{resolution}"')
    return [part for key_value in sets for part in ("--set", key_value)]


class CopyMachineTab:
    def __init__(self, page: Page):
        self.page = page
        self.running: CopyMachineProcess | None = None

    def status(self, progress: Progress, process: CopyMachineProcess, state: str = "") -> str:
        t = self.page.texts
        parts = [f"**{t('step')}:** {t(progress.step or 'starting')}"]
        if progress.counter is not None:
            done, total = progress.counter
            parts.append(f"**{t('kohya_steps')}:** {done}/{total}")
        parts.append(f"**{t('elapsed')}:** {minutes(process.elapsed)}")
        if progress.remaining:
            parts.append(f"**{t('remaining')}:** {progress.remaining}")
        return " · ".join(parts) + (f"\n\n**{state}**" if state else "")

    def argv(self, base: str, before: str | None, after: str | None, method: str, sdxl: bool, preset: str,
             sets: list[str], new_rank: int, clamp_quantile: float | None, dynamic_method: str,
             dynamic_param: float | None, output: str, preview: bool, preview_args: str, work_dir: str,
             bake_precision: str, delete_merged_base: bool) -> list[str]:
        settings = self.page.settings
        if not settings.sd_scripts:
            raise CopyloraError(self.page.texts("needs_sd_scripts"))
        out = in_output_folder(output, self.page.output_dir) if output else None
        clamp = 1.0 if clamp_quantile is None else clamp_quantile  # an emptied field: the exact difference
        work = in_output_folder(work_dir.strip(), self.page.output_dir) if work_dir and work_dir.strip() else None
        return [
            "--sd-scripts", settings.sd_scripts, *optional("--python", settings.python),
            *(["--base", base] if base else []), *(["--before", before] if before else []),
            *(["--after", after] if after else []), *(["--output", str(out)] if out else []),
            "--method", method, *(["--sdxl"] if sdxl else []), *optional("--preset", preset), *sets,
            "--new_rank", str(int(new_rank)), "--clamp_quantile", f"{clamp:g}",
            *optional("--dynamic_method", dynamic_method), *optional("--dynamic_param", dynamic_param),
            *(["--preview"] if preview else []),
            *(["--preview-args", preview_args] if preview and preview_args else []),
            *(["--work-dir", str(work)] if work else []),
            *optional("--bake-precision", bake_precision), *(["--delete-merged-base"] if delete_merged_base else []),
        ]

    def results(self, args: argparse.Namespace, progress: Progress) -> tuple[str | None, str, str, str | None]:
        """The picture (preview grid, else A and B side by side), fidelity and table, report, download."""
        output: Path = args.output.resolve()
        grid = output.parent / f"{output.stem}_preview" / "grid.png"
        picture = grid if args.preview and grid.is_file() else output.with_suffix(".training.png")
        measured = progress.fidelity
        if args.method == "subtract":
            work = (args.work_dir or output.parent / f"{output.stem}_work").resolve()
            table, totals, _ = measure(output, [str(work / "B.safetensors"), str(work / "A.safetensors")],
                                       [1.0, -1.0], args.clamp_quantile)
            measured = f"{totals}\n\n{table}"
        report = ""
        if progress.report and progress.report.is_file():
            report = self.served_pictures(progress.report.read_text(encoding="utf-8"), progress.report.parent)
        download = self.page.servable(output)
        return (str(picture) if picture.is_file() else None), measured, report, (str(download) if download else None)

    def served_pictures(self, markdown: str, folder: Path) -> str:
        """The report's pictures, linked relative to the report file, as the page's URLs for them."""

        def served(match: re.Match[str]) -> str:
            path = self.page.servable(folder / match[2])
            return f"![{match[1]}](/gradio_api/file={path.as_posix()})" if path else match[0]

        return re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", served, markdown)

    def run(self, base: str, before: str | None, after: str | None, method: str, sdxl: bool, preset: str,
            max_train_epochs: int, max_train_steps: int, network_dim: int, learning_rate: float, resolution: str,
            new_rank: int, clamp_quantile: float | None, dynamic_method: str, dynamic_param: float | None,
            output: str, preview: bool, preview_args: str, work_dir: str, bake_precision: str,
            delete_merged_base: bool) -> Iterator[Results]:
        """`copylora copy-machine` with these flags (and kohya's keys as --set), streamed; its parameter names
        are the page's API."""
        t = self.page.texts
        if self.running is not None and self.running.process.poll() is None:
            raise CopyloraError(t("already_running"))
        sets = kohya_sets(max_train_epochs, max_train_steps, network_dim, learning_rate, resolution)
        argv = self.argv(base, before, after, method, sdxl, preset, sets, new_rank, clamp_quantile, dynamic_method,
                         dynamic_param, output, preview, preview_args, work_dir, bake_precision, delete_merged_base)
        args = parse(copy_machine.build_parser(), argv)  # the command's own checks of its flags, before it starts
        process = self.running = CopyMachineProcess(argv)
        progress = Progress()
        ended = False
        while not ended:
            lines, ended = process.lines(POLL_SECONDS)
            for line in lines:
                progress.feed(line)
            yield self.status(progress, process), "\n".join(progress.lines), None, "", "", None
        code = process.wait()
        if process.stopped:
            yield self.status(progress, process, t("stopped")), "\n".join(progress.lines), None, "", "", None
            return
        if code != 0:
            raise CopyloraError((progress.errors or [f"exit code {code}"])[-1].split(": error: ", 1)[-1])
        yield (self.status(progress, process, t("finished")), "\n".join(progress.lines), *self.results(args, progress))

    def stop(self) -> str:
        if self.running is None or self.running.process.poll() is not None:
            return self.page.texts("not_running")
        self.running.stop()
        return self.page.texts("stopped")


SDXL_KEY = "conditioner.embedders.1."  # SDXL's second text encoder, in a single-file checkpoint
SD_KEYS = ("cond_stage_model.", "model.diffusion_model.")  # SD1.x/2.x single-file keys (without SDXL's)


def detected_sdxl(base: str) -> bool | None:
    """Whether the base is SDXL, from a .safetensors header or a diffusers folder; None when it cannot be
    told (no such file yet, a .ckpt): the checkbox then stays as the user set it."""
    path = Path(base.strip()).expanduser() if base and base.strip() else None
    if path is None:
        return None
    if (path / "model_index.json").is_file():
        return (path / "text_encoder_2").is_dir()
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except (SafetensorError, OSError, ValueError):
        return None  # the command says what is wrong with it when it runs
    if any(key.startswith(SDXL_KEY) for key in keys):
        return True
    return False if any(key.startswith(SD_KEYS) for key in keys) else None


def follow_base(base: gr.Textbox, sdxl: gr.Checkbox) -> None:
    """Tick or untick SDXL when the base model says which it is (the user may still override it)."""

    def update(path: str):  # type: ignore[no-untyped-def]
        found = detected_sdxl(path)
        return gr.update() if found is None else gr.update(value=found)

    base.change(update, base, sdxl, api_visibility="private", show_progress="hidden")


def preset_choices(page: Page) -> list[tuple[str, str]]:
    return [(page.texts("preset_default"), ""), *((p.stem, p.stem) for p in sorted(PRESETS_DIR.glob("*.toml")))]


def build(page: Page) -> None:
    t = page.texts
    tab = CopyMachineTab(page)
    run = shows_errors(copy_machine.PROG)(tab.run)

    gr.Markdown(t("cm_intro"))
    with gr.Row():
        base = gr.Textbox(label=t("base"), info=t("base_info"), elem_id="cm-base", scale=3)
        sdxl = gr.Checkbox(label=t("sdxl"), value=False, elem_id="cm-sdxl")
        method = gr.Radio(label=t("method"), choices=list(copy_machine.METHODS), value="subtract",
                          info=t("method_info"), elem_id="cm-method", scale=2)
    with gr.Row():
        before = gr.File(label=t("before"), type="filepath", file_types=["image"], elem_id="cm-before")
        after = gr.File(label=t("after"), type="filepath", file_types=["image"], elem_id="cm-after")
    with gr.Row():
        before_image = gr.Image(label=t("before"), interactive=False, height=220, elem_id="cm-before-image")
        after_image = gr.Image(label=t("after"), interactive=False, height=220, elem_id="cm-after-image")
    follow_base(base, sdxl)
    before.change(lambda path: path, before, before_image, api_visibility="private")
    after.change(lambda path: path, after, after_image, api_visibility="private")
    with gr.Row():
        preset = gr.Dropdown(label=t("preset"), choices=preset_choices(page), value="")
        max_train_epochs = gr.Number(label=t("max_train_epochs"), value=0, precision=0, minimum=0)
        max_train_steps = gr.Number(label=t("max_train_steps"), value=0, precision=0, minimum=0, elem_id="cm-steps")
        network_dim = gr.Number(label=t("network_dim"), value=0, precision=0, minimum=0)
        learning_rate = gr.Number(label=t("learning_rate"), value=0, minimum=0)
        resolution = gr.Textbox(label=t("resolution"), value="", placeholder="600,900")
    with gr.Row():
        new_rank = gr.Number(label=t("new_rank"), value=16, precision=0, minimum=1)
        clamp_quantile = gr.Number(label=t("clamp_quantile"), value=1.0, minimum=0, maximum=1, info=t("clamp_info"))
        dynamic_method = gr.Dropdown(label=t("dynamic_method"), choices=dynamic_choices(), value="",
                                     info=t("dynamic_method_info"))
        dynamic_param = gr.Number(label=t("dynamic_param"), value=0)
    with gr.Row():
        output = gr.Textbox(label=t("output"), value="edit.safetensors", info=t("save_to_info"), elem_id="cm-output")
        preview = gr.Checkbox(label=t("with_preview"), value=False, elem_id="cm-preview")
        preview_args = gr.Textbox(label=t("preview_args"), value="", placeholder="--steps 20 --seeds 1 2 3",
                                  elem_id="cm-preview-args")
    with gr.Row():
        work_dir = gr.Textbox(label=t("work_dir"), value="", info=t("work_dir_info"), elem_id="cm-work-dir")
        bake_precision = gr.Dropdown(label=t("bake_precision"), choices=list(kohya_bake.PRECISIONS), value="fp16")
        delete_merged_base = gr.Checkbox(label=t("delete_merged_base"), value=False)
    with gr.Row():
        run_button = gr.Button(t("run"), variant="primary", elem_id="cm-run")
        stop_button = gr.Button(t("stop"), variant="stop", elem_id="cm-stop")
    status = gr.Markdown(elem_id="cm-status")
    log = gr.Textbox(label=t("log"), lines=8, max_lines=12, autoscroll=True, elem_id="cm-log")
    with gr.Row():
        picture = gr.Image(label=t("picture"), type="filepath", interactive=False, elem_id="cm-picture")
        fidelity = gr.Code(label=t("fidelity"), language=None, elem_id="cm-fidelity")
    report = gr.Markdown(label=t("report"), elem_id="cm-report")
    download = gr.File(label=t("download"), elem_id="cm-download")
    run_button.click(
        run,
        [base, before, after, method, sdxl, preset, max_train_epochs, max_train_steps, network_dim, learning_rate,
         resolution, new_rank, clamp_quantile, dynamic_method, dynamic_param, output, preview, preview_args,
         work_dir, bake_precision, delete_merged_base],
        [status, log, picture, fidelity, report, download],
        api_name="copy_machine",
    )
    stop_button.click(tab.stop, None, status, api_name="stop", concurrency_limit=None)
