"""Is one backend's merge a correct float32 computation of the reference's? (engine and CUDA tests)

Two correct float32 implementations do not agree to a fixed relative tolerance: W = P·Q is
formed from factors whose product can cancel (B − A: ‖P‖_F‖Q‖_F / ‖W‖_F is 50–250 on real
pairs), so rounding moves W by about eps·‖P‖_F‖Q‖_F, i.e. eps times that condition number
relative to ‖W‖. Everything here is bounded by that perturbation δ:

- singular values move by at most δ in 2-norm (Hoffman–Wielandt);
- the kept rank-k product moves by δ plus δ·σ₁/gap at the truncation (Wedin);
- each kept singular vector turns by about δ/gap to its neighbours (Davis–Kahan), so its
  direction is compared only where that is small;
- the clamp is checked on its own: its level is the q-quantile of the unclamped values, and an
  order statistic moves by no more than the largest change of any value, so the backend's level
  may differ from the reference's by the largest difference of their unclamped factors; and the
  clamped output must be the backend's own unclamped output clipped at its own level.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import pytest
import torch

from copylora.engine import balanced, ops, reference
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from copylora.engine.quantile import linear_quantile
from copylora.pipelines.fidelity import as_factors, squared_distance

EXT = ops.load_status()
# the ext backend's tests skip where copylora._C is not built (a bare clone without a compiler); CI requires it
requires_ext = pytest.mark.skipif(not EXT.available, reason=f"copylora._C not built ({EXT.error})")

EPS = torch.finfo(torch.float32).eps
ROUNDING = 8 * EPS  # per unit of ‖P‖_F‖Q‖_F; the real SD1.5 pair reaches 0.4 eps (S) and 2.5 eps (product)
DIRECTION_LIMIT = 1e-2  # compare a vector's direction only where rounding can turn it less than this

Runner = Callable[[list[ModuleJob], SvdOptions], Mapping[str, MergedModule]]


def perturbation(job: ModuleJob) -> float:
    """δ = ROUNDING·‖P‖_F‖Q‖_F: how far float32 rounding can move this module's W."""
    p, q = reference.stacked_factors(job)
    return ROUNDING * p.double().norm().item() * q.double().norm().item()


def joined(merged: MergedModule, rank: int) -> torch.Tensor:
    """The values stock's clamp sees: up[:, :rank] and down[:rank], flattened together."""
    return torch.cat([merged.up[:, :rank].reshape(-1), merged.down[:rank].reshape(-1)])


def assert_product_matches(job: ModuleJob, ours: MergedModule, ref: MergedModule) -> None:
    """Unclamped results: shapes, singular values, the kept product, each well-separated pair."""
    up, down, s = ours.up.cpu(), ours.down.cpu(), ours.singular_values.cpu()
    assert up.dtype == down.dtype == s.dtype == torch.float32, job.name
    assert (up.shape, down.shape, s.shape) == (ref.up.shape, ref.down.shape, ref.singular_values.shape), job.name
    delta = perturbation(job)
    ref_s = ref.singular_values.double()
    assert (s.double() - ref_s).norm().item() <= delta, (job.name, s, ref_s)

    kept = min(job.rank, s.numel())
    # W has rank ≤ m, so past its m values come exact zeros: the last value's lower neighbour
    padded = torch.cat([ref_s, ref_s.new_zeros(1)])
    gaps = padded[:-1] - padded[1:]
    truncation_gap = gaps[kept - 1].item() if 0 < kept < s.numel() else math.inf
    sigma_1 = ref_s[0].item() if ref_s.numel() else 0.0
    allowed = delta * (1.0 + 2.0 * sigma_1 / truncation_gap) if truncation_gap > 0 else math.inf
    distance = squared_distance(as_factors(up, down), as_factors(ref.up, ref.down)) ** 0.5
    assert distance <= allowed, (job.name, distance, allowed)

    for j in range(kept):
        neighbour_gap = min(gaps[j].item(), gaps[j - 1].item() if j > 0 else math.inf)
        if neighbour_gap <= 0 or 2.0 * delta / neighbour_gap > DIRECTION_LIMIT:
            continue  # near-equal values: any basis of their subspace is right
        turn = 2.0 * delta / neighbour_gap + 1e-5
        for ours_vec, ref_vec in ((up[:, j], ref.up[:, j]), (down[j], ref.down[j])):
            ours_vec, ref_vec = ours_vec.double(), ref_vec.double()
            ref_norm = ref_vec.norm().item()
            assert abs(ours_vec.norm().item() - ref_norm) <= (turn + 1e-5) * ref_norm + delta, (job.name, j)
            # same direction, same sign: the sign convention makes the pair unique
            assert (ours_vec - ref_vec).norm().item() <= turn * ref_norm + 2 * delta, (job.name, j)
    assert torch.count_nonzero(up[:, kept:]) == 0 and torch.count_nonzero(down[kept:]) == 0, job.name


def assert_clamp_matches(job: ModuleJob, plain: MergedModule, clamped: MergedModule, ref_plain: MergedModule,
                         quantile: float) -> None:
    """The clamp: the level against the reference's, the clipping against the backend's own level."""
    rank = job.rank
    level = linear_quantile(joined(plain, rank).cpu(), quantile).item()
    ref_level = linear_quantile(joined(ref_plain, rank), quantile).item()
    moved = (joined(plain, rank).cpu() - joined(ref_plain, rank)).abs().max().item()
    assert abs(level - ref_level) <= moved + 4 * EPS * abs(ref_level), (job.name, level, ref_level, moved)
    up, down = plain.up.cpu(), plain.down.cpu()
    torch.testing.assert_close(clamped.up.cpu(), up.clamp(-level, level), rtol=1e-6, atol=0, msg=job.name)
    torch.testing.assert_close(clamped.down.cpu(), down.clamp(-level, level), rtol=1e-6, atol=0, msg=job.name)
    torch.testing.assert_close(clamped.singular_values.cpu(), plain.singular_values.cpu(), rtol=0, atol=0)


def assert_backend_matches(jobs: list[ModuleJob], options: SvdOptions, run: Runner) -> None:
    """Run the backend unclamped (and clamped, if options clamp) and check it against the reference."""
    if options.sqrt_split and options.clamps:
        # merge_jobs clamps stock's U·S, Vᵀ and splits after: check those, then the split itself
        stock_options = dataclasses.replace(options, sqrt_split=False)
        assert_backend_matches(jobs, stock_options, run)
        stock, split = run(jobs, stock_options), run(jobs, options)
        for job in jobs:
            want = balanced(stock[job.name])
            torch.testing.assert_close(split[job.name].up.cpu(), want.up, rtol=1e-6, atol=0, msg=job.name)
            torch.testing.assert_close(split[job.name].down.cpu(), want.down, rtol=1e-6, atol=0, msg=job.name)
        return
    unclamped = dataclasses.replace(options, clamp_quantile=1.0)
    plain = run(jobs, unclamped)
    clamped = run(jobs, options) if options.clamps else plain
    assert set(plain) == set(clamped) == {job.name for job in jobs}
    for job in jobs:
        ref = reference.merge_module(job, unclamped)
        assert_product_matches(job, plain[job.name], ref)
        if options.clamps:
            assert_clamp_matches(job, plain[job.name], clamped[job.name], ref, options.clamp_quantile)
