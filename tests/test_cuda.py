"""The CUDA kernels of copylora._C against the pure-torch reference (skipped without a GPU).

Everything the CPU tests check, on the device: the Jacobi core SVD (and ATen's float64 SVD for
cores too big for shared memory), the fused assembly from fp16/bf16, the sign fix, and the radix-select
clamp. Where there is no GPU, .ci/compile_cuda.sh still compiles the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copylora.engine import merge_jobs, ops, reference
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from tests.backend_compare import assert_backend_matches, assert_product_matches
from tests.conftest import GoldenCase, golden_params
from tests.test_engine import DTYPES, EXT, cancelling_jobs, golden_jobs, random_job
from tests.test_gram_route import CHOLESKY_QR, GRAM, HOUSEHOLDER, well_conditioned_jobs, zero_and_deficient_jobs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not EXT.available, reason=f"copylora._C not built ({EXT.error})"),
]


def run_cuda(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    result = merge_jobs(jobs, options, backend="ext", device="cuda")
    assert result.backend == "ext (C++ CUDA)"
    return result.modules


def group_args(job: ModuleJob, dtype: torch.dtype | None = None) -> tuple:
    """copylora::merge_group's arguments for one module, on the GPU."""
    ups = [u.to("cuda", dtype or u.dtype) for u in job.ups]
    downs = [d.to("cuda", dtype or d.dtype) for d in job.downs]
    return ups, downs, torch.tensor([job.scales], device="cuda"), [job.rank]


def test_build_has_cuda_kernels():
    """Where torch sees a GPU, the extension must have been built with its CUDA kernels."""
    if os.environ.get("COPYLORA_REQUIRE_EXT") != "1" and not EXT.cuda:
        pytest.skip("copylora._C was built without CUDA (only CI requires it)")
    assert EXT.cuda


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    out=st.integers(1, 160),
    in_features=st.integers(1, 160),
    conv=st.booleans(),
    input_ranks=st.lists(st.integers(1, 128), min_size=1, max_size=5).map(tuple),
    rank=st.integers(1, 128),
    modules=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    clamp=st.sampled_from([0.99, 1.0, 0.5, 0.0]),
    sqrt_split=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cuda_matches_reference(out, in_features, conv, input_ranks, rank, modules, dtype, clamp, sqrt_split, seed):
    gen = torch.Generator().manual_seed(seed)
    in_flat = in_features * (9 if conv else 1)
    scales = [1.0, -1.0, 0.5, -2.0, 0.75][: len(input_ranks)]
    jobs = [random_job(gen, f"m{b}", out, in_flat, input_ranks, scales, rank, dtype) for b in range(modules)]
    assert_backend_matches(jobs, SvdOptions(clamp_quantile=clamp, sqrt_split=sqrt_split), run_cuda)


# Graded spectra near the Jacobi limit (R = 160-169 need 24-27 sweeps); R >= 170 is too big for
# shared memory and goes to cuSOLVER (in float64: in float32 its S was 1e-5 too large at R = 256).
CORE_SIZES = pytest.mark.parametrize(
    "input_ranks",
    [(1,), (8, 8), (33,), (64, 64), (16,) * 10, (80, 80), (84, 85), (128, 128), (128, 128, 64)],
    ids=["r1", "8+8", "odd33", "64+64", "10x16", "160", "169", "256", "320"],
)


def core_size_jobs(input_ranks: tuple[int, ...]) -> list[ModuleJob]:
    """Four modules whose merged R = sum(input_ranks) is below min(out, in): the factored path."""
    gen = torch.Generator().manual_seed(7)
    total = sum(input_ranks)
    scales = [1.0, -1.0] * len(input_ranks)
    return [random_job(gen, f"m{b}", total + 50, 2 * total + 3, input_ranks, scales[: len(input_ranks)], 16)
            for b in range(4)]


@CORE_SIZES
def test_core_sizes(input_ranks):
    """Also the Jacobi kernel's norm drift: its rotations with c rounded to 1 grew S by 1e-5 at R = 128."""
    assert_backend_matches(core_size_jobs(input_ranks), SvdOptions(), run_cuda)


@pytest.mark.parametrize("case", golden_params("golden"))
def test_golden_modules_on_cuda(case: GoldenCase):
    assert_backend_matches(golden_jobs(case), SvdOptions(), run_cuda)


def factored_on_cuda(job: ModuleJob, method: str) -> tuple[MergedModule, int]:
    """copylora::factored_svd of one job on the GPU, as an unclamped merge result, and its route."""
    p, q = reference.stacked_factors(job, "cuda")
    u, s, vh, route = torch.ops.copylora.factored_svd(p[None], q[None], job.rank, method)
    u, vh = reference.fix_signs(u[0].cpu(), vh[0].cpu())
    up, down = reference.lora_factors(u, s[0].cpu(), vh, job.rank, sqrt_split=False)
    return MergedModule(up=up, down=down, singular_values=s[0].cpu()), int(route[0])


@pytest.mark.parametrize(("rank_each", "method", "route"), [
    (8, "auto", CHOLESKY_QR), (32, "auto", GRAM), (8, "gram", GRAM), (32, "qr", CHOLESKY_QR),
    (32, "householder", HOUSEHOLDER)])
def test_each_route_on_cuda(rank_each, method, route):
    """decompose.h on the GPU (issue 22): Cholesky-QR below R = 64, the Gram route from it, either
    when forced, and the kernel's former Householder QR; each right, on cancelling pairs too."""
    unclamped = SvdOptions(clamp_quantile=1.0)
    for job in well_conditioned_jobs(rank_each):
        ours, taken = factored_on_cuda(job, method)
        assert taken == route, job.name
        assert_product_matches(job, ours, reference.merge_module(job, unclamped))
    for job in well_conditioned_jobs(rank_each, 1e-3):  # cancelling: Cholesky-QR hands these to Householder
        assert_product_matches(job, factored_on_cuda(job, method)[0], reference.merge_module(job, unclamped))


def test_routes_hand_what_they_cannot_factor_to_householder_on_cuda():
    """A zero module and a rank-deficient one fail both Cholesky routes; merge_group's result for
    them is still right."""
    jobs = zero_and_deficient_jobs()
    for method in ("gram", "qr"):
        assert [factored_on_cuda(job, method)[1] for job in jobs] == [HOUSEHOLDER, HOUSEHOLDER]
    assert_backend_matches(jobs, SvdOptions(), run_cuda)


def test_cancelling_pairs_on_cuda():
    assert_backend_matches(cancelling_jobs(), SvdOptions(), run_cuda)


def test_nan_in_a_factor_is_an_error():
    """NaN norms would sort first and leave slots unwritten: the kernel must refuse, like the CPU's."""
    gen = torch.Generator().manual_seed(8)
    job = random_job(gen, "m", 64, 96, (8, 8), [1.0, -1.0], 8)
    job.ups[1][3, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.merge_group(*group_args(job), 0.99, False)
        torch.cuda.synchronize()


def test_tf32_setting_does_not_change_the_result():
    """A caller that enabled TF32 (about 1e-3 error in bmm) must still get float32 products."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert_backend_matches(cancelling_jobs(2), SvdOptions(), run_cuda)
        assert torch.backends.cuda.matmul.allow_tf32  # the caller's setting is left as it was
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float64])
def test_other_float_dtypes_are_dispatched(dtype):
    gen = torch.Generator().manual_seed(10)
    job = random_job(gen, "m", 48, 64, (4, 4), [1.0, -1.0], 8)
    cast = ModuleJob("m", [u.to(dtype) for u in job.ups], [d.to(dtype) for d in job.downs], job.scales, job.rank)
    assert_backend_matches([cast], SvdOptions(), run_cuda)


def test_opcheck_on_cuda():
    gen = torch.Generator().manual_seed(4)
    job = random_job(gen, "m", 24, 40, (4, 4), [1.0, -1.0], 6)
    torch.library.opcheck(torch.ops.copylora.merge_group.default, (*group_args(job), 0.99, False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_out_dtype_on_cuda(dtype):
    """up and down in out_dtype are the float32 result cast once; S stays float32."""
    gen = torch.Generator().manual_seed(11)
    job = random_job(gen, "m", 300, 700, (8, 8), [1.0, -1.0], 16)
    up, down, s = ops.merge_group(*group_args(job), 0.99, False)
    cast_up, cast_down, cast_s = ops.merge_group(*group_args(job), 0.99, False, dtype)
    assert cast_up.dtype == cast_down.dtype == dtype and cast_s.dtype == torch.float32
    assert torch.equal(cast_up, up.to(dtype)) and torch.equal(cast_down, down.to(dtype)) and torch.equal(cast_s, s)


def test_clamp_level_on_cuda():
    """The radix-select clamp lands on torch.quantile's level (to the last bit but an FMA)."""
    gen = torch.Generator().manual_seed(5)
    job = random_job(gen, "m", 300, 700, (8, 8), [1.0, -1.0], 16)
    args = group_args(job)
    up, down, _ = ops.merge_group(*args, 1.0, False)
    level = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    clamped_up, clamped_down, _ = ops.merge_group(*args, 0.99, False)
    torch.testing.assert_close(clamped_up, up.clamp(-level, level), rtol=1e-6, atol=0)
    torch.testing.assert_close(clamped_down, down.clamp(-level, level), rtol=1e-6, atol=0)
