"""Settings: the sd-scripts folder and kohya's Python (found as `copy-machine` finds them), the output folder
and the language, kept in the user's config folder; and `copylora doctor`'s report."""

from __future__ import annotations

import gradio as gr

from copylora import doctor
from copylora.errors import CopyloraError
from copylora.kohya.checkout import find_checkout
from copylora.kohya.job import kohya_python
from copylora.webui import settings as gui_settings
from copylora.webui.cli_calls import shows_errors
from copylora.webui.i18n import LANGUAGES
from copylora.webui.page import Page


def kohya_line(page: Page) -> str:
    """Which checkout and which Python the commands will use, as `copy-machine` finds them."""
    settings = page.settings
    if not settings.sd_scripts:
        return page.texts("sd_scripts_missing")
    checkout = find_checkout(settings.sd_scripts)
    return page.texts("sd_scripts_found", path=checkout, python=kohya_python(settings.python or None, checkout))


def build(page: Page) -> None:
    t = page.texts

    @shows_errors("copylora.gui")
    def save_settings(sd_scripts: str, python: str, output_dir: str, language: str) -> tuple[str, str]:
        """Check the kohya folder, save everything; kohya's folder and Python apply now, the rest at the next start."""
        candidate = gui_settings.Settings(sd_scripts=sd_scripts.strip(), python=python.strip(),
                                          output_dir=output_dir.strip(), language=language)
        found = kohya_line(Page(t, candidate))  # a folder that is no checkout is refused before it is saved
        path = gui_settings.save(candidate)
        page.settings.sd_scripts, page.settings.python = candidate.sd_scripts, candidate.python
        return found, t("saved_settings", path=path)

    settings = page.settings
    sd_scripts = gr.Textbox(label=t("sd_scripts"), value=settings.sd_scripts, info=t("sd_scripts_info"),
                            elem_id="settings-sd-scripts")
    python = gr.Textbox(label=t("python"), value=settings.python, info=t("python_info"), elem_id="settings-python")
    with gr.Row():
        output_dir = gr.Textbox(label=t("output_dir"), value=str(page.output_dir), elem_id="settings-output-dir")
        language = gr.Radio(label=t("language"), choices=list(LANGUAGES), value=page.texts.language)
    button = gr.Button(t("save_settings"), variant="primary", elem_id="settings-save")
    try:
        found = kohya_line(page)
    except CopyloraError as exc:  # a saved folder that went away: say so, the page still opens
        found = str(exc)
    kohya = gr.Textbox(label="kohya", value=found, elem_id="settings-kohya")
    saved = gr.Markdown(elem_id="settings-saved")
    gr.Code(label=t("doctor"), value="\n".join(doctor.report()), language=None, elem_id="settings-doctor")
    button.click(save_settings, [sd_scripts, python, output_dir, language], [kohya, saved], api_name="settings")
