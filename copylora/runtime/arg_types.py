"""Argument types that refuse, while the command line is parsed, numbers no merge can use.

A NaN, an Inf or a value past float32's range (1e39) in --ratios or --lbws would surface only
deep in the engine (NaN factors, a failed SVD). These raise CopyloraError, which argparse lets
through, so the refusal is the commands' usual one line and exit code 2.
"""

from __future__ import annotations

import json
import math

import torch

from copylora.errors import CopyloraError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _usable(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def finite_float(text: str) -> float:
    """A number float32 can hold; text that is no number at all is argparse's own error."""
    value = float(text)
    if not _usable(value):
        raise CopyloraError(f"{text!r}: not a usable number (NaN, Inf or past float32's range ±{FLOAT32_MAX:.4g})")
    return value


def finite_lbw(text: str) -> str:
    """One --lbws JSON list, checked for NaN/Infinity/1e39 (copylora.formats.naming.parse_lbws
    checks the rest, and says so when it is not JSON)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    numbers = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not _usable(v) for v in numbers):
        raise CopyloraError(f"--lbws {text!r}: every weight must be a finite number within float32's range")
    return text
