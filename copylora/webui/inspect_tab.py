"""Inspect: `copylora inspect` — ranks per block, fidelity against the files it came from, the spectra."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from copylora import inspect as inspect_cli
from copylora.engine import BACKEND_CHOICES
from copylora.pipelines.fidelity import Summary, block_summaries, format_table, render_table, totals_line
from copylora.pipelines.inspection import inspect_lora, rank_rows
from copylora.reports.spectrum_plot import plot_spectra
from copylora.webui.cli_calls import optional, parse, paths, shows_errors, words
from copylora.webui.page import Page


def measure(lora: Path, against: list[str] | None, ratios: list[float] | None,
            clamp_quantile: float | None = None, plot: Path | None = None, lbws: list[str] | None = None,
            backend: str = "auto") -> tuple[str, str, Path | None]:
    """What `copylora inspect` prints: the per-block table, the totals line ("" without `against`), and the
    spectra picture written to `plot`."""
    inspection = inspect_lora(lora, [Path(p) for p in against] if against else None, ratios, lbws, clamp_quantile,
                              backend)
    if inspection.fidelity is None:
        table, totals = render_table(*rank_rows(inspection)), ""
    else:
        total = Summary("total", inspection.fidelity)
        table, totals = format_table(block_summaries(inspection.fidelity), total), totals_line(total, inspection.dtype)
    if plot is not None:
        plot_spectra(inspection.spectra, plot, title=inspection.path.name)
    return table, totals, plot


def build(page: Page) -> None:
    t = page.texts

    @shows_errors(inspect_cli.PROG)
    def inspect(lora: str | None, against: list[str] | None, ratios: str, lbws: str = "",
                clamp_quantile: float | None = None, backend: str = "auto") -> tuple[str, str, str | None]:
        argv = [*paths(lora), *(["--against", *paths(against)] if against else []),
                *(["--ratios", *words(ratios)] if words(ratios) else []),
                *(["--lbws", *words(lbws)] if words(lbws) else []),
                *optional("--clamp_quantile", clamp_quantile),
                "--backend", backend or "auto"]
        args = parse(inspect_cli.build_parser(), argv)
        page.output_dir.mkdir(parents=True, exist_ok=True)
        plot = page.output_dir / f"{args.lora.stem}.spectrum.png"
        table, totals, picture = measure(args.lora, args.against, args.ratios, args.clamp_quantile, plot, args.lbws,
                                         args.backend)
        return table, totals, str(picture) if picture else None

    lora = gr.File(label=t("lora"), type="filepath", file_types=[".safetensors", ".ckpt", ".pt"], elem_id="inspect-lora")
    with gr.Row():
        against = gr.File(label=t("against"), file_count="multiple", type="filepath", elem_id="inspect-against")
        ratios = gr.Textbox(label=t("inspect_ratios"), value="", info=t("ratios_info"), elem_id="inspect-ratios")
    with gr.Row():
        lbws = gr.Textbox(label=t("lbws"), value="", info=t("lbws_info"), scale=2)
        clamp_quantile = gr.Number(label=t("clamp_quantile"), value=0, minimum=0, maximum=1,
                                   info=t("inspect_clamp_info"))
        backend = gr.Dropdown(label=t("backend"), choices=list(BACKEND_CHOICES), value="auto", info=t("backend_info"))
    button = gr.Button(t("inspect_button"), variant="primary", elem_id="inspect-run")
    table = gr.Code(label=t("block_table"), language=None, elem_id="inspect-table")
    totals = gr.Textbox(label=t("fidelity"), elem_id="inspect-totals")
    spectrum = gr.Image(label=t("spectrum"), type="filepath", elem_id="inspect-spectrum")
    button.click(inspect, [lora, against, ratios, lbws, clamp_quantile, backend], [table, totals, spectrum],
                 api_name="inspect")
