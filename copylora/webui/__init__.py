"""`copylora gui`'s page (Gradio): one module per tab, each calling the CLI's own functions.

The tab modules import gradio: load them only through copylora.gui, which says how to install it when it
is missing (launcher and settings do without it).
"""
