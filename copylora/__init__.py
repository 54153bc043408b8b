"""copylora: fast copy-machine LoRA (コピー機LoRA) for kohya sd-scripts users."""

__version__ = "0.1.0"
