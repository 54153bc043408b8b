"""The merge engine: runs a list of ModuleJobs on the chosen backend and says which one ran.

Backends:
- "ext": copylora._C (C++ on ATen, parallel across modules; CUDA kernels when built with CUDA),
  called once per group of same-shaped modules.
- "torch": the pure-torch steps of copylora.engine.reference, batched per group of same-shaped
  modules (Cholesky-QR twice below R = 64, the Gram route from it, torch's batched SVD);
  reference.merge_module, one at a time with Householder QR, is what it is tested against.
"auto" picks "ext" when the extension loads (with CUDA kernels, for a CUDA device), else "torch"
with a warning that says why. The CUDA kernel passed bench/gpu_check.py on an H200 and was as fast
as the torch backend or faster at every R measured there (bench/README.md), so auto keeps it on CUDA.

Jobs whose factors are formed on demand (LoHa, LoKr: ModuleJob.load) are formed a batch at a time
(formed_batches), so a file's adapter pairs are never all in memory.

Imports nothing of copylora's but copylora.errors and the build record (runtime.extension_build):
it knows factors and ranks, not files or kohya.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import torch

from copylora.engine import ops, reference
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from copylora.errors import CopyloraError

__all__ = ["BACKEND_CHOICES", "EngineResult", "ModuleJob", "MergedModule", "SvdOptions", "merge_jobs", "resolve_backend"]

logger = logging.getLogger("copylora")

BACKEND_CHOICES = ("auto", "ext", "torch")


@dataclass
class EngineResult:
    modules: dict[str, MergedModule]
    backend: str  # e.g. "ext (C++ cpu)", "torch (cuda)"
    seconds: float


@lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A fallback is said once per process, not once per engine call."""
    logger.warning(message)


def resolve_backend(requested: str, device: torch.device) -> str:
    """'ext' or 'torch' for this request; raises if 'ext' was asked for and cannot run."""
    if requested == "torch":  # without loading _C: the process a user without the extension runs
        return "torch"
    status = ops.load_status()
    if not status.available:
        if requested == "ext":
            raise CopyloraError(f"--backend ext: the copylora._C extension did not load ({status.error})")
        warn_once(f"copylora._C extension unavailable ({status.error}); using the pure-torch backend")
        return "torch"
    if device.type == "cuda" and not status.cuda:
        if requested == "ext":
            raise CopyloraError("--backend ext: copylora._C was built without CUDA kernels; rebuild with CUDA")
        warn_once(f"copylora._C was built without CUDA kernels; using the pure-torch backend on {device}")
        return "torch"
    return "ext"


def group_jobs(jobs: Iterable[ModuleJob]) -> list[list[ModuleJob]]:
    groups: dict[tuple, list[ModuleJob]] = defaultdict(list)
    for job in jobs:
        groups[job.group_key()].append(job)
    return list(groups.values())


# Formed factors per engine call where jobs form them on demand (LoHa, LoKr): what a file of them
# costs beyond its own size, whatever its size.
FORMED_BATCH_BYTES = 64 << 20


def formed_batches(group: list[ModuleJob]) -> Iterator[list[ModuleJob]]:
    """A group as the engine runs it: whole, or, where its jobs form their factors on demand, in
    batches of at most FORMED_BATCH_BYTES of factors, each formed just before it runs."""
    if all(job.load is None for job in group):
        yield group
        return
    size = max(1, FORMED_BATCH_BYTES // group[0].factor_bytes)  # a group's jobs have one shape
    for begin in range(0, len(group), size):
        yield [job.loaded() for job in group[begin : begin + size]]


def _run_group_ext(
    group: list[ModuleJob], options: SvdOptions, device: torch.device, out_dtype: torch.dtype
) -> list[MergedModule]:
    ups = [u.to(device) for job in group for u in job.ups]
    downs = [d.to(device) for job in group for d in job.downs]
    scales = torch.tensor([job.scales for job in group], dtype=torch.float32, device=device)
    ranks = [job.rank for job in group]
    up, down, s = ops.merge_group(ups, downs, scales, ranks, options.clamp_quantile, options.sqrt_split, out_dtype)
    up, down, s = up.cpu(), down.cpu(), s.cpu()
    return [
        MergedModule(up=up[b, :, : job.rank], down=down[b, : job.rank], singular_values=s[b])
        for b, job in enumerate(group)
    ]


TORCH_BATCH_FLOATS = 1 << 22  # float32 values of P, Q (and W where dense) per batched call: ~16 MB


@contextmanager
def float32_matmul(device: torch.device) -> Iterator[None]:
    """cuBLAS products in full float32 even where the caller allowed TF32 (about 1e-3 error)."""
    if device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def _run_group_torch(
    group: list[ModuleJob], options: SvdOptions, device: torch.device, out_dtype: torch.dtype
) -> list[MergedModule]:
    first = group[0]
    per_module = first.total_rank * (first.out_features + first.in_features)
    if first.total_rank >= min(first.out_features, first.in_features):
        per_module += first.out_features * first.in_features
    elif device.type == "cpu" and first.total_rank >= reference.GRAM_MIN_RANK:
        per_module *= 3  # the Gram route's float64 copies of P and Q
    size = max(1, TORCH_BATCH_FLOATS // per_module)
    results = []
    with float32_matmul(device):
        for begin in range(0, len(group), size):
            results.extend(reference.merge_batch(group[begin : begin + size], options, device, out_dtype))
    return results


def balanced(merged: MergedModule) -> MergedModule:
    """Each pair rescaled so that its up column and down row have equal norms: the same product.

    Unclamped that is √S on each side; after stock's clamp of U·S and Vᵀ it keeps the clamped
    delta exactly, split as evenly as the clamp left it.
    """
    up_norms, down_norms = merged.up.norm(dim=0), merged.down.norm(dim=1)
    live = (up_norms > 0) & (down_norms > 0)
    factor = torch.where(live, (up_norms / torch.where(live, down_norms, 1.0)).sqrt(), 1.0)
    return MergedModule(merged.up / factor, merged.down * factor[:, None], merged.singular_values)


def cast(merged: MergedModule, dtype: torch.dtype) -> MergedModule:
    return MergedModule(merged.up.to(dtype), merged.down.to(dtype), merged.singular_values)


def merge_jobs(
    jobs: list[ModuleJob],
    options: SvdOptions,
    backend: str = "auto",
    device: torch.device | str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> EngineResult:
    """Merge every job; results are on the CPU, keyed by job name.

    The merge runs in float32; up and down come back cast to out_dtype (a float dtype), each
    value rounded once, as `.to(out_dtype)` of the float32 result would. Asking for the dtype
    the file is saved in spares a float32 copy of the whole output. on_progress(done, total) is
    called after each group.
    """
    device = torch.device(device)
    chosen = resolve_backend(backend, device)
    run_group = _run_group_ext if chosen == "ext" else _run_group_torch
    # √S on both factors and then the clamp cuts far deeper than stock's clamp of U·S and Vᵀ
    # (real pair: 40 % median error instead of 8 %), so clamp stock's factors and split after
    split_after_clamp = options.sqrt_split and options.clamps
    backend_options = dataclasses.replace(options, sqrt_split=False) if split_after_clamp else options
    backend_dtype = torch.float32 if split_after_clamp else out_dtype  # the split needs the float32 result
    start = time.perf_counter()
    results: dict[str, MergedModule] = {}
    for group in group_jobs(jobs):
        for batch in formed_batches(group):
            for job, merged in zip(batch, run_group(batch, backend_options, device, backend_dtype)):
                results[job.name] = cast(balanced(merged), out_dtype) if split_after_clamp else merged
            del batch, job  # a batch's formed factors go before the next batch is formed
        if on_progress is not None:
            on_progress(len(results), len(jobs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if chosen == "ext":
        label = f"ext (C++ {'CUDA' if device.type == 'cuda' else 'CPU'})"
    else:
        label = f"torch ({device.type})"
    return EngineResult(modules=results, backend=label, seconds=seconds)
