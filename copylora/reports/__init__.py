"""Pictures and reports: the preview grid, spectrum plots, the copy-machine report.

Imports copylora.formats, copylora.pipelines and copylora.kohya; never a command module.
"""
