"""The page: one tab per command, in one language, served by Gradio on this machine only by default."""

from __future__ import annotations

import gradio as gr

from copylora.webui import copy_machine_tab, inspect_tab, merge_tab, preview_tab, resize_tab, settings_tab
from copylora.webui.page import Page


def build_app(page: Page) -> gr.Blocks:
    t = page.texts
    with gr.Blocks(title=t("title"), analytics_enabled=False) as app:
        gr.Markdown(f"## {t('title')}\n{t('intro')}")
        with gr.Tab(t("tab_copy_machine"), id="copy_machine"):
            copy_machine_tab.build(page)
        with gr.Tab(t("tab_merge"), id="merge"):
            merge_tab.build(page)
        with gr.Tab(t("tab_resize"), id="resize"):
            resize_tab.build(page)
        with gr.Tab(t("tab_inspect"), id="inspect"):
            inspect_tab.build(page)
        with gr.Tab(t("tab_preview"), id="preview"):
            preview_tab.build(page)
        with gr.Tab(t("tab_settings"), id="settings"):
            settings_tab.build(page)
    return app


def serve(app: gr.Blocks, page: Page, host: str, port: int, auth: tuple[str, str] | None, open_browser: bool,
          block: bool = True) -> str:
    """Start the server; its URL. Files are served from the output folder only (uploads included), and never
    through a share link (which would need the internet and expose the machine)."""
    page.output_dir.mkdir(parents=True, exist_ok=True)
    _, url, _ = app.queue().launch(
        server_name=host, server_port=port, auth=auth, share=False, inbrowser=open_browser,
        allowed_paths=[str(page.output_dir)], ssr_mode=False, mcp_server=False, show_error=False,
        prevent_thread_lock=not block, quiet=False,
    )
    return url
