"""Preview: `copylora preview` — the LoRA at several strengths, same seeds, made by kohya's gen_img.py, in a grid."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from copylora import preview as preview_cli
from copylora.errors import CopyloraError
from copylora.webui.cli_calls import optional, parse, paths, shows_errors, words
from copylora.webui.copy_machine_tab import follow_base
from copylora.webui.page import Page


def build(page: Page) -> None:
    t = page.texts

    @shows_errors(preview_cli.PROG)
    def preview(base: str, loras: list[str] | None, strengths: str, seeds: str, prompt: str, width: int,
                height: int, steps: int, sdxl: bool, gen_img_args: str) -> tuple[str, str]:
        """`copylora preview --base … --lora(s) … --out OUTPUT/NAME_preview`: the grid and where the rest went."""
        settings = page.settings
        if not settings.sd_scripts:
            raise CopyloraError(t("needs_sd_scripts"))
        files = paths(loras)
        out = page.output_dir / f"{Path(files[0]).stem if files else 'lora'}_preview"
        argv = [
            "--sd-scripts", settings.sd_scripts, *optional("--python", settings.python),
            *(["--base", base] if base else []), *(["--lora" if len(files) == 1 else "--loras", *files] if files else []),
            "--out", str(out), *(["--strengths", *words(strengths)] if words(strengths) else []),
            *(["--seeds", *words(seeds)] if words(seeds) else []), *[part for line in (prompt or "").splitlines() if line.strip() for part in ("--prompt", line.strip())],
            *optional("--width", width), *optional("--height", height), "--steps", str(int(steps)),
            *(["--sdxl"] if sdxl else []),
        ]
        args = parse(preview_cli.build_parser(), argv)
        args.gen_img_args = words(gen_img_args)  # what the command takes after `--`
        job = preview_cli.plan(args)
        grid, seconds = preview_cli.render(job)
        return str(grid), f"{seconds:.0f} s (kohya's gen_img); {job.out}"

    with gr.Row():
        base = gr.Textbox(label=t("base"), info=t("base_info"), elem_id="preview-base", scale=3)
        sdxl = gr.Checkbox(label=t("sdxl"), value=False)
    follow_base(base, sdxl)
    loras = gr.File(label=t("preview_lora"), file_count="multiple", type="filepath",
                    file_types=[".safetensors", ".ckpt", ".pt"], elem_id="preview-loras")
    with gr.Row():
        strengths = gr.Textbox(label=t("strengths"), value="0 0.5 1", elem_id="preview-strengths")
        seeds = gr.Textbox(label=t("seeds"), value="1 2 3", elem_id="preview-seeds")
        prompt = gr.Textbox(label=t("prompt"), value="", lines=2, info=t("prompt_info"), elem_id="preview-prompt",
                            scale=2)
    with gr.Row():
        width = gr.Number(label=t("width"), value=0, precision=0, minimum=0, elem_id="preview-width")
        height = gr.Number(label=t("height"), value=0, precision=0, minimum=0, elem_id="preview-height")
        steps = gr.Number(label=t("steps"), value=20, precision=0, minimum=1)
        gen_img_args = gr.Textbox(label=t("gen_img_args"), value="", placeholder="--tokenizer_cache_dir DIR", scale=2)
    button = gr.Button(t("preview_button"), variant="primary", elem_id="preview-run")
    summary = gr.Textbox(label=t("summary"), elem_id="preview-summary")
    grid = gr.Image(label=t("grid"), type="filepath", interactive=False, elem_id="preview-grid")
    button.click(preview, [base, loras, strengths, seeds, prompt, width, height, steps, sdxl, gen_img_args],
                 [grid, summary], api_name="preview")
