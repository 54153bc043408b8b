"""Resize: `copylora resize` — a LoRA to a smaller (or dynamic) rank."""

from __future__ import annotations

import gradio as gr

from copylora import resize as resize_cli
from copylora.engine import BACKEND_CHOICES
from copylora.merge import configure_logging
from copylora.pipelines.svd_resize import resize_file
from copylora.webui.cli_calls import in_output_folder, optional, parse, paths, shows_errors
from copylora.webui.merge_tab import dynamic_choices, precision_choices
from copylora.webui.page import Page


def build(page: Page) -> None:
    t = page.texts

    @shows_errors(resize_cli.PROG)
    def resize(model: str | None, new_rank: int, new_conv_rank: int | None, save_precision: str,
               dynamic_method: str, dynamic_param: float | None, uniform_alpha: bool, device: str,
               save_to: str, backend: str = "auto") -> tuple[str, str, str | None]:
        """`copylora resize --model … --verbose`: the summary line and the per-module retention lines."""
        output = in_output_folder(save_to, page.output_dir) if save_to else None
        argv = [*(["--model", *paths(model)] if model else []), "--new_rank", str(int(new_rank)),
                *optional("--new_conv_rank", new_conv_rank), *optional("--save_precision", save_precision),
                *optional("--dynamic_method", dynamic_method), *optional("--dynamic_param", dynamic_param),
                *(["--uniform_alpha"] if uniform_alpha else []), *optional("--device", device),
                *(["--save_to", str(output)] if output else []), "--quiet", "--backend", backend or "auto"]
        args = parse(resize_cli.build_parser(), argv)
        configure_logging(args.quiet)
        summary = resize_file(resize_cli.request_from_args(args))
        download = page.servable(summary.output)
        return summary.line(), "\n".join(resize_cli.retention_report(summary)), str(download) if download else None

    model = gr.File(label=t("model"), type="filepath", file_types=[".safetensors", ".ckpt", ".pt", ".pth"],
                    elem_id="resize-model")
    with gr.Row():
        new_rank = gr.Number(label=t("new_rank"), value=8, precision=0, minimum=1, elem_id="resize-new-rank")
        new_conv_rank = gr.Number(label=t("new_conv_rank"), value=0, precision=0, minimum=0)
        save_to = gr.Textbox(label=t("save_to"), value="resized.safetensors", info=t("save_to_info"),
                             elem_id="resize-save-to")
    with gr.Row():
        save_precision = gr.Dropdown(label=t("save_precision"), choices=precision_choices("float"), value="fp16")
        dynamic_method = gr.Dropdown(label=t("dynamic_method"), choices=dynamic_choices(), value="",
                                     info=t("dynamic_method_info"))
        dynamic_param = gr.Number(label=t("dynamic_param"), value=0)
        uniform_alpha = gr.Checkbox(label=t("uniform_alpha"), value=False, info=t("uniform_alpha_info"))
        device = gr.Dropdown(label=t("device"), choices=["cpu", "cuda"], value="cpu")
        backend = gr.Dropdown(label=t("backend"), choices=list(BACKEND_CHOICES), value="auto", info=t("backend_info"))
    button = gr.Button(t("resize_button"), variant="primary", elem_id="resize-run")
    summary = gr.Textbox(label=t("summary"), elem_id="resize-summary")
    retention = gr.Code(label=t("per_module"), language=None, elem_id="resize-retention")
    download = gr.File(label=t("download"), elem_id="resize-download")
    button.click(resize, [model, new_rank, new_conv_rank, save_precision, dynamic_method, dynamic_param,
                          uniform_alpha, device, save_to, backend], [summary, retention, download], api_name="resize")
