"""The pure-torch factored merge against the dense stock algorithm, and the quantile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from copylora.engine import reference
from copylora.engine.jobs import ModuleJob, SvdOptions
from copylora.engine.quantile import linear_quantile
from copylora.engine.reference import cholesky_qr2, dense_stock_merge, fix_signs, merge_module, stacked_factors, thin_svd
from tests.backend_compare import EPS, perturbation


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@st.composite
def jobs(draw, max_rank: int = 64) -> ModuleJob:
    out_features = draw(st.integers(1, 96))
    in_channels = draw(st.integers(1, 48))
    kernel = draw(st.sampled_from([1, 3]))  # 3: a 3×3 conv, its down flattened to in·9
    in_features = in_channels * kernel * kernel
    n = draw(st.integers(1, 5))
    ranks = [draw(st.integers(1, max_rank)) for _ in range(n)]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    ups = [torch.randn(out_features, r, generator=generator) for r in ranks]
    downs = [torch.randn(r, in_features, generator=generator) for r in ranks]
    # missing alpha means alpha = dim, i.e. scale = ratio
    scales = [draw(st.sampled_from([1.0, -1.0, 0.5, -0.125])) * draw(st.sampled_from([1.0, 1 / r])) for r in ranks]
    rank = draw(st.integers(1, max(1, min(out_features, in_channels))))
    return ModuleJob("m", ups, downs, scales, rank)


def dense_delta(job: ModuleJob) -> torch.Tensor:
    return sum(s * u.double() @ d.double() for u, d, s in zip(job.ups, job.downs, job.scales)).float()


@settings(max_examples=60, deadline=None)
@given(jobs())
def test_factored_svd_reconstructs_the_dense_delta(job):
    """Before truncation and clamp, U·S·Vh from the factors is W within float32 rounding: of the
    factors, which for cancelling inputs is far more than eps·‖W‖ (tests/backend_compare.py), and of
    W itself."""
    u, s, vh = thin_svd(*stacked_factors(job))
    w = dense_delta(job)
    assert float(((u * s) @ vh - w).norm()) <= perturbation(job) + EPS * float(w.norm())
    assert s.shape[0] == job.num_singular_values
    assert torch.all(s[:-1] >= s[1:])


@settings(max_examples=60, deadline=None)
@given(jobs())
def test_truncated_factors_match_dense_stock_without_clamp(job):
    """Kept rank-k reconstruction equals the dense SVD's best rank-k approximation."""
    ours = merge_module(job, SvdOptions(clamp_quantile=1.0))
    up, down = dense_stock_merge(job, clamp_quantile=1.0 - 1e-12)  # unclamped in practice
    ref = up @ down
    w = dense_delta(job)
    # when singular values tie at the cut the subspace is not unique; compare errors instead
    err_ours, err_ref = float((ours.up @ ours.down - w).norm()), float((ref - w).norm())
    assert err_ours <= err_ref * (1 + 1e-4) + 1e-5 * float(w.norm())
    assert ours.up.shape == (job.out_features, job.rank) and ours.down.shape == (job.rank, job.in_features)


@settings(max_examples=40, deadline=None)
@given(jobs(max_rank=16))
def test_clamp_level_is_stock_quantile_of_our_factors(job):
    unclamped = merge_module(job, SvdOptions(clamp_quantile=1.0))
    clamped = merge_module(job, SvdOptions(clamp_quantile=0.99))
    joined = torch.cat([unclamped.up.flatten(), unclamped.down.flatten()])
    hi = torch.quantile(joined, 0.99)
    assert torch.equal(clamped.up, unclamped.up.clamp(-hi, hi))
    assert torch.equal(clamped.down, unclamped.down.clamp(-hi, hi))


def test_signs_are_fixed_and_output_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    job = ModuleJob("m", [torch.randn(40, 8, generator=generator)], [torch.randn(8, 30, generator=generator)], [1.0], 6)
    first, second = merge_module(job, SvdOptions()), merge_module(job, SvdOptions())
    assert torch.equal(first.up, second.up) and torch.equal(first.down, second.down)
    u, _ = fix_signs(first.up, first.down)
    rows = first.up.abs().argmax(dim=0)
    assert torch.all(first.up[rows, torch.arange(6)] > 0)
    assert torch.equal(u, first.up)


def test_rank_above_true_rank_is_zero_padded():
    generator = torch.Generator().manual_seed(1)
    job = ModuleJob("m", [torch.randn(64, 2, generator=generator)], [torch.randn(2, 64, generator=generator)], [1.0], 8)
    merged = merge_module(job, SvdOptions(clamp_quantile=1.0))
    assert merged.up.shape == (64, 8) and merged.down.shape == (8, 64)
    assert torch.count_nonzero(merged.up[:, 2:]) == 0 and torch.count_nonzero(merged.down[2:]) == 0
    assert relative(merged.up @ merged.down, dense_delta(job)) <= 1e-5


def test_all_zero_module_stays_zero():
    """Real kohya files have modules whose lora_up never trained (all zero)."""
    job = ModuleJob("m", [torch.zeros(32, 8), torch.zeros(32, 8)], [torch.randn(8, 16), torch.randn(8, 16)], [1.0, -1.0], 16)
    merged = merge_module(job, SvdOptions())
    assert torch.count_nonzero(merged.up @ merged.down) == 0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 5000), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_linear_quantile_equals_torch_quantile(n, q, seed):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(linear_quantile(values, q), torch.quantile(values, q))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 400), st.integers(1, 6), st.floats(0.0, 1.0), st.integers(0, 2**31))
def test_linear_quantile_with_repeated_values_in_rows(n, distinct, q, seed):
    """The upper neighbour is found without a second selection: rows of few distinct values
    (ties at and around the quantile's position) must still give torch.quantile's value per row."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(0, distinct, (3, n), generator=gen).float() * 0.5 - 1.0
    assert torch.equal(linear_quantile(values, q), torch.quantile(values, q, dim=-1))


def test_linear_quantile_beyond_torch_quantile_limit():
    """torch.quantile refuses > 2**24 elements (sd-scripts#1485); selection has no limit."""
    n = 2**24 + 3
    values = torch.arange(n, dtype=torch.float32)
    with pytest.raises(RuntimeError):
        torch.quantile(values, 0.99)
    position = torch.tensor(0.99, dtype=torch.float32) * (n - 1)
    assert float(linear_quantile(values, 0.99)) == pytest.approx(float(position), rel=1e-6)


def test_cholesky_qr2_hands_what_it_cannot_factor_to_householder():
    """A batch mixing a well-conditioned matrix with an all-zero one, a rank-deficient one (an
    input whose up never trained) and a graded one at cond 1e6 (beyond float32 Cholesky-QR): each
    comes back as an exact thin QR — orthonormal Q where the matrix has full rank, Q·R = A."""
    gen = torch.Generator().manual_seed(5)
    good = torch.randn(200, 16, generator=gen)
    deficient = torch.cat([torch.randn(200, 8, generator=gen), torch.zeros(200, 8)], dim=1)
    basis = torch.linalg.qr(torch.randn(200, 16, generator=gen))[0]
    graded = basis * torch.logspace(0, -6, 16)
    a = torch.stack([good, torch.zeros(200, 16), deficient, graded])
    q, r = cholesky_qr2(a)
    assert torch.isfinite(q).all() and torch.isfinite(r).all()
    assert torch.allclose(q @ r, a, atol=1e-5)
    for full_rank in (q[0], q[3]):
        assert torch.allclose(full_rank.mT @ full_rank, torch.eye(16), atol=1e-5)


def test_cholesky_qr2_deviation_guard_routes_to_householder(monkeypatch):
    """No float32 matrix found passes the first Cholesky yet leaves QᵀQ more than 0.1 from I (the
    Cholesky fails first), so the guard is checked by lowering its threshold: every matrix then
    comes back exactly as torch.linalg.qr factors it."""
    monkeypatch.setattr(reference, "CHOLESKY_QR_DEVIATION", -1.0)
    a = torch.randn(3, 120, 16, generator=torch.Generator().manual_seed(6))
    q, r = cholesky_qr2(a)
    q_h, r_h = torch.linalg.qr(a)
    assert torch.equal(q, q_h) and torch.equal(r, r_h)


def test_small_lapack_calls_run_on_one_thread_and_the_count_is_restored(monkeypatch):
    """MKL splits even a 32×32 SVD across the team, and with sleeping threads that costs more
    than it saves (bench/README.md): the torch backend's R×R calls run on one thread, and the
    caller's thread count is back afterwards — also when a call fails."""
    seen: list[int] = []

    def recording(function):
        def call(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return function(*args, **kwargs)
        return call

    for name in ("svd", "cholesky_ex", "solve_triangular"):
        monkeypatch.setattr(torch.linalg, name, recording(getattr(torch.linalg, name)))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(7)
        jobs = [ModuleJob(f"m{i}", [torch.randn(64, 8, generator=gen) for _ in "ab"],
                          [torch.randn(8, 96, generator=gen) for _ in "ab"], [1.0, -0.5], 16) for i in range(3)]
        reference.merge_batch(jobs, SvdOptions(), "cpu")
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2

        def failing(*args, **kwargs):
            raise RuntimeError("LAPACK failed")

        monkeypatch.setattr(torch.linalg, "svd", failing)
        with pytest.raises(RuntimeError, match="LAPACK failed"):
            reference.small_svd(torch.randn(4, 4))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
