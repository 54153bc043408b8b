"""Difference / merge: `copylora merge` — any number of LoRAs, each with its own ratio (negative allowed,
no rescaling), then its summary, the fidelity against the exact weighted sum and the spectra."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from copylora import merge as merge_cli
from copylora.engine import BACKEND_CHOICES
from copylora.pipelines.dynamic_rank import DYNAMIC_METHODS
from copylora.pipelines.svd_merge import PRECISIONS
from copylora.webui.cli_calls import in_output_folder, optional, parse, paths, shows_errors, words
from copylora.webui.inspect_tab import measure
from copylora.webui.page import Page


def precision_choices(default_label: str) -> list[tuple[str, str]]:
    return [(default_label, ""), *((name, name) for name in PRECISIONS)]


def dynamic_choices() -> list[tuple[str, str]]:
    return [("-", ""), *((name, name) for name in DYNAMIC_METHODS)]


def slider_values(text: str, count: int) -> list[float]:
    """The ratios field's values for `count` sliders: B − A's 1, -1 where it has fewer, clipped to a slider's range."""
    try:
        given = [float(word) for word in words(text)]
    except ValueError:
        given = []
    defaults = [1.0, -1.0] + [0.0] * max(0, count - 2)
    return [max(-2.0, min(2.0, value)) for value in (given + defaults[len(given):])[:count]]


def build(page: Page) -> None:
    t = page.texts

    @shows_errors(merge_cli.PROG)
    def merge(
        models: list[str] | None,
        ratios: str,
        new_rank: int,
        new_conv_rank: int | None,
        precision: str,
        save_precision: str,
        clamp_quantile: float,
        dynamic_method: str,
        dynamic_param: float | None,
        device: str,
        save_to: str,
        lbws: str = "",
        split_sv: bool = False,
        per_module_alpha: bool = False,
        backend: str = "auto",
    ) -> tuple[str, str, str, str | None, str | None]:
        """`copylora merge --models … --ratios … --report`; then the per-block table and the spectra."""
        output = in_output_folder(save_to, page.output_dir) if save_to else None
        clamp = 1.0 if clamp_quantile is None else clamp_quantile  # an emptied field: the page's default
        argv = [
            "--models", *paths(models), "--ratios", *words(ratios), "--new_rank", str(int(new_rank)),
            *optional("--new_conv_rank", new_conv_rank), "--precision", precision or "float",
            *optional("--save_precision", save_precision), "--clamp_quantile", f"{clamp:g}",
            *optional("--dynamic_method", dynamic_method), *optional("--dynamic_param", dynamic_param),
            *optional("--device", device), *(["--save_to", str(output)] if output else []), "--report", "--quiet",
            *(["--lbws", *words(lbws)] if words(lbws) else []), *(["--split_sv"] if split_sv else []),
            *(["--per_module_alpha"] if per_module_alpha else []), "--backend", backend or "auto",
        ]
        args = parse(merge_cli.build_parser(), argv)
        summary = merge_cli.merge(args)
        table, totals, plot = measure(summary.output, args.models, args.ratios, args.clamp_quantile,
                                      summary.output.with_suffix(".spectrum.png"), args.lbws, args.backend)
        download = page.servable(summary.output)
        return summary.line(), totals, table, str(plot), str(download) if download else None

    gr.Markdown(t("merge_intro"))
    models = gr.File(label=t("models"), file_count="multiple", type="filepath",
                     file_types=[".safetensors", ".ckpt", ".pt"], elem_id="merge-models")
    with gr.Row():
        ratios = gr.Textbox(label=t("ratios"), value="1 -1", info=t("ratios_info"), elem_id="merge-ratios")
        save_to = gr.Textbox(label=t("save_to"), value="difference.safetensors", info=t("save_to_info"),
                             elem_id="merge-save-to")

    @gr.render(inputs=[models, ratios], triggers=[models.change, ratios.change])
    def ratio_sliders(files: list[str] | None, text: str) -> None:
        """One slider per file, −2 to 2, kept in step with the ratios field (which the API and the merge read)."""
        sliders = [gr.Slider(-2, 2, value=ratio, step=0.05, label=f"{index + 1}: {Path(file).name}",
                             elem_classes="merge-ratio")
                   for index, (file, ratio) in enumerate(zip(paths(files), slider_values(text, len(paths(files)))))]
        for slider in sliders:
            slider.release(lambda *values: " ".join(f"{v:g}" for v in values), sliders, ratios,
                           api_visibility="private")
    with gr.Row():
        new_rank = gr.Number(label=t("new_rank"), value=16, precision=0, minimum=1, elem_id="merge-new-rank")
        new_conv_rank = gr.Number(label=t("new_conv_rank"), value=0, precision=0, minimum=0)
        clamp_quantile = gr.Number(label=t("clamp_quantile"), value=1.0, minimum=0, maximum=1,
                                   info=t("clamp_info"), elem_id="merge-clamp")
    with gr.Row():
        precision = gr.Dropdown(label=t("precision"), choices=list(PRECISIONS), value="float")
        save_precision = gr.Dropdown(label=t("save_precision"), choices=precision_choices(t("same_as_precision")),
                                     value="fp16")
        dynamic_method = gr.Dropdown(label=t("dynamic_method"), choices=dynamic_choices(), value="",
                                     info=t("dynamic_method_info"))
        dynamic_param = gr.Number(label=t("dynamic_param"), value=0)
        device = gr.Dropdown(label=t("device"), choices=["cpu", "cuda"], value="cpu")
    with gr.Row():
        lbws = gr.Textbox(label=t("lbws"), value="", info=t("lbws_info"), scale=2)
        split_sv = gr.Checkbox(label=t("split_sv"), value=False)
        per_module_alpha = gr.Checkbox(label=t("per_module_alpha"), value=False)
        backend = gr.Dropdown(label=t("backend"), choices=list(BACKEND_CHOICES), value="auto", info=t("backend_info"))
    button = gr.Button(t("merge_button"), variant="primary", elem_id="merge-run")
    summary = gr.Textbox(label=t("summary"), elem_id="merge-summary")
    totals = gr.Textbox(label=t("fidelity"), elem_id="merge-fidelity")
    table = gr.Code(label=t("block_table"), language=None, elem_id="merge-table")
    spectrum = gr.Image(label=t("spectrum"), type="filepath", elem_id="merge-spectrum")
    download = gr.File(label=t("download"), elem_id="merge-download")
    button.click(
        merge,
        [models, ratios, new_rank, new_conv_rank, precision, save_precision, clamp_quantile, dynamic_method,
         dynamic_param, device, save_to, lbws, split_sv, per_module_alpha, backend],
        [summary, totals, table, spectrum, download],
        api_name="merge",
    )
