"""What kohya's scripts accept as a base model, checked before minutes of model loading: a
checkpoint file (.safetensors, .ckpt, .pt, .pth, .bin) or a diffusers folder — not a LoRA."""

from __future__ import annotations

import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from copylora.errors import CopyloraError

WHAT = "a .safetensors/.ckpt checkpoint or a diffusers folder"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# key fragments only adapter files have (kohya/LyCORIS/PEFT names)
ADAPTER_KEY_FRAGMENTS = (".lora_down.", ".lora_up.", ".hada_w1", ".lokr_w1", ".lora_A.", ".lora_B.")
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # a legacy torch.save file starts with a pickle PROTO opcode


def check_base_model(base: Path) -> None:
    """Raise a one-line CopyloraError unless `base` looks like something kohya loads as a model."""
    if base.is_dir():
        if not (base / "model_index.json").is_file():
            raise CopyloraError(f"{base}: a folder without model_index.json: not a diffusers model ({WHAT})")
        return
    if not base.is_file():
        raise CopyloraError(f"{base}: no such base model ({WHAT})")
    if base.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise CopyloraError(f"{base}: not a model file ({WHAT}; got {base.suffix or 'no suffix'!r})")
    if base.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(base)
        if any(fragment in key for key in keys for fragment in ADAPTER_KEY_FRAGMENTS):
            raise CopyloraError(f"{base}: a LoRA, not a base model (give it as the LoRA; the base is {WHAT})")
    elif not zipfile.is_zipfile(base) and not _starts_with(base, PICKLE_PROTOCOL_2_PLUS):
        raise CopyloraError(f"{base}: not a torch checkpoint (neither a zip archive nor a pickle)")


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names from the header only (a checkpoint is gigabytes)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return list(file.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CopyloraError(f"{path}: not a readable .safetensors file ({str(exc).splitlines()[0]})") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as file:
        return file.read(len(magic)) == magic
