"""`copylora gui`'s page (Gradio): one module per tab, each calling the CLI's own functions.

Imports gradio: load it only through copylora.gui, which says how to install it when it is missing.
"""
