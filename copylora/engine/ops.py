"""Thin Python wrappers over the ops that copylora._C registers with TORCH_LIBRARY.

The op (schema in csrc/copylora.cpp):

    copylora::merge_group(Tensor[] ups, Tensor[] downs, Tensor scales, int[] ranks,
                          float clamp_quantile, bool sqrt_split, ScalarType? out_dtype=None)
                          -> (Tensor, Tensor, Tensor)

merges B modules of one shape class at once. With n inputs per module, ups[b*n + i] is module
b's input i, (out, r_i); downs[b*n + i] is (r_i, in); all modules share out, in and (r_1..r_n).
scales is (B, n) float32; ranks[b] is module b's kept rank. It returns up (B, out, K) and
down (B, K, in) in out_dtype (float32 when None: the result is computed in float32 and cast
once), and S (B, m) in float32, with K = max(ranks), m = min(R, out, in); columns past
ranks[b] are zero. The maths and conventions are those of copylora.engine.reference.

The CPU and CUDA kernels also register, for tests and benchmarks (the engine does not call it):

    copylora::factored_svd(Tensor p, Tensor q, int kept, str method='auto') -> (Tensor, Tensor, Tensor, Tensor)

one batch's W = P·Q (p (B, out, R), q (B, R, in), float32) decomposed as merge_group decomposes it:
U (B, out, k), S (B, m), Vh (B, k, in) with k = min(kept, m), and each module's route (0 dense,
1 Gram, 2 Cholesky-QR twice, 3 Householder); method 'gram' or 'qr' forces the Gram or the
Cholesky-QR route where 'auto' picks by R, and 'householder' the CUDA kernel's QR before issue 22.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from copylora.runtime.extension_build import BuildRecord

PACKAGE_FOLDER = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ExtensionStatus:
    available: bool
    error: str | None = None
    cpu: bool = False  # the build carries CPU kernels
    cuda: bool = False  # the build carries CUDA kernels
    path: str | None = None  # where the loaded extension lives


@lru_cache(maxsize=1)
def load_status() -> ExtensionStatus:
    """Import copylora._C once; say why not when it fails (never silently)."""
    try:
        from copylora import _C  # registers the ops
    except (ImportError, OSError) as exc:
        record = BuildRecord.load(PACKAGE_FOLDER)
        if record is not None and record.built == "none":  # left out on purpose: say why, not ImportError
            return ExtensionStatus(available=False, error=f"not built: {record.why}")
        return ExtensionStatus(available=False, error=f"{type(exc).__name__}: {exc}")
    _register_fake()

    def has_kernel(key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key("copylora::merge_group", key)

    return ExtensionStatus(available=True, cpu=has_kernel("CPU"), cuda=has_kernel("CUDA"), path=_C.__file__)


def _register_fake() -> None:
    """Shapes without data, for torch.compile / FakeTensor / meta tracing."""

    @torch.library.register_fake("copylora::merge_group")
    def _(ups, downs, scales, ranks, clamp_quantile, sqrt_split, out_dtype=None):
        dtype = out_dtype or torch.float32
        modules = len(ranks)
        max_rank = max(ranks, default=0)
        if modules == 0:
            return (scales.new_empty((0, 0, max_rank), dtype=dtype), scales.new_empty((0, max_rank, 0), dtype=dtype),
                    scales.new_empty((0, 0)))
        inputs = len(ups) // modules
        out, in_features = ups[0].shape[0], downs[0].shape[1]
        total_rank = sum(d.shape[0] for d in downs[:inputs])
        singular = min(total_rank, out, in_features)
        return (
            scales.new_empty((modules, out, max_rank), dtype=dtype),
            scales.new_empty((modules, max_rank, in_features), dtype=dtype),
            scales.new_empty((modules, singular)),
        )


def merge_group(
    ups: list[torch.Tensor],
    downs: list[torch.Tensor],
    scales: torch.Tensor,
    ranks: list[int],
    clamp_quantile: float,
    sqrt_split: bool,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.ops.copylora.merge_group.default(ups, downs, scales, ranks, clamp_quantile, sqrt_split, out_dtype)
