"""The extension engine (copylora._C) against the pure-torch reference, on the CPU.

What must agree: singular values, each module's up and down (the sign convention makes them
unique wherever the spectrum is not degenerate), hence the reconstruction up @ down, with and
without stock's clamp. test_cuda.py runs the same checks on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copylora import doctor
from copylora.engine import merge_jobs, ops, reference
from copylora.engine.jobs import ModuleJob, SvdOptions
from copylora.lora_file import read_lora
from tests.conftest import GOLDEN
from tests.lora_compare import relative_error

EXT = ops.load_status()
requires_ext = pytest.mark.skipif(not EXT.available, reason=f"copylora._C not built ({EXT.error})")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = 1e-5  # relative Frobenius error allowed between backends
EPS = torch.finfo(torch.float32).eps


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F in float64; two all-zero tensors agree."""
    a, b = a.double(), b.double()
    norm = b.norm().item()
    diff = (a - b).norm().item()
    return diff if norm == 0.0 else diff / norm


def random_job(
    gen: torch.Generator,
    name: str,
    out: int,
    in_features: int,
    input_ranks: tuple[int, ...],
    scales: list[float],
    rank: int,
    dtype: torch.dtype = torch.float32,
) -> ModuleJob:
    ups = [torch.randn(out, r, generator=gen).to(dtype) for r in input_ranks]
    downs = [torch.randn(r, in_features, generator=gen).to(dtype) for r in input_ranks]
    return ModuleJob(name, ups, downs, scales, rank)


def sensitivity(s: torch.Tensor, kept: int) -> tuple[float, float]:
    """How far float32 rounding alone can move (the truncated reconstruction, the kept vectors).

    A singular subspace moves by about eps·σ₁/gap under a perturbation of relative size eps
    (Wedin's theorem): the reconstruction depends on the gap at the truncation, each kept
    vector on the gaps to its neighbours. Two correct float32 backends differ by that much,
    whatever the tolerance says, so it is added to it; well-separated spectra get 1e-5.
    """
    s = s.double()
    if s.numel() == 0 or s[0] == 0:
        return 0.0, 0.0
    scale = 64 * EPS * s[0].item()

    def bound(gap: float) -> float:
        return float("inf") if gap <= 0 else scale / gap

    truncation = bound((s[kept - 1] - s[kept]).item()) if 0 < kept < s.numel() else 0.0
    gaps = (s[:-1] - s[1:])[: min(kept, s.numel() - 1)]
    vectors = bound(gaps.min().item()) if gaps.numel() else 0.0
    return truncation, max(truncation, vectors)


def assert_matches_reference(job: ModuleJob, merged, options: SvdOptions) -> None:
    """One backend's MergedModule against reference.merge_module on the same job."""
    ref = reference.merge_module(job, options)
    up, down, s = merged.up.cpu(), merged.down.cpu(), merged.singular_values.cpu()
    assert up.dtype == down.dtype == s.dtype == torch.float32
    assert up.shape == ref.up.shape and down.shape == ref.down.shape and s.shape == ref.singular_values.shape
    assert relative(s, ref.singular_values) <= TOLERANCE, (job.name, s, ref.singular_values)
    truncation, vectors = sensitivity(ref.singular_values, min(job.rank, s.numel()))
    reconstruction = relative_error((up.double(), down.double()), (ref.up.double(), ref.down.double()))
    assert reconstruction <= TOLERANCE + truncation, job.name
    if options.clamps and vectors > TOLERANCE:
        # Near-equal singular values: each backend's vectors are a valid but different basis
        # of the same subspace, and the clamp (per value) is not basis-independent.
        return
    assert relative(up, ref.up) <= TOLERANCE + vectors, job.name
    assert relative(down, ref.down) <= TOLERANCE + vectors, job.name


def run_ext(jobs: list[ModuleJob], options: SvdOptions, device: str = "cpu"):
    return merge_jobs(jobs, options, backend="ext", device=device)


shapes = st.fixed_dictionaries(
    {
        "out": st.integers(1, 96),
        "in": st.integers(1, 96),
        "conv": st.booleans(),  # a 3×3 conv: down flattened to in·9 columns
        "input_ranks": st.lists(st.integers(1, 128), min_size=1, max_size=5).map(tuple),
        "rank": st.integers(1, 128),
    }
)


@requires_ext
@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    modules=st.integers(1, 3),
    scales=st.lists(st.floats(-3.0, 3.0).filter(lambda s: abs(s) > 1e-3), min_size=5, max_size=5),
    dtype=st.sampled_from(DTYPES),
    clamp=st.sampled_from([0.99, 1.0, 0.5, 0.0]),
    sqrt_split=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ext_matches_reference(shape, modules, scales, dtype, clamp, sqrt_split, seed):
    gen = torch.Generator().manual_seed(seed)
    in_features = shape["in"] * (9 if shape["conv"] else 1)
    ranks = shape["input_ranks"]
    jobs = [
        random_job(gen, f"m{b}", shape["out"], in_features, ranks, scales[: len(ranks)], shape["rank"], dtype)
        for b in range(modules)
    ]
    options = SvdOptions(clamp_quantile=clamp, sqrt_split=sqrt_split)
    result = run_ext(jobs, options)
    assert result.backend == "ext (C++ CPU)"
    for job in jobs:
        assert_matches_reference(job, result.modules[job.name], options)


@requires_ext
def test_mixed_shapes_and_ranks_in_one_call():
    """Jobs of several shape classes, and different kept ranks inside one class."""
    gen = torch.Generator().manual_seed(1)
    specs = [
        (64, 96, (8, 8), 16), (64, 96, (8, 8), 4), (64, 96, (8, 8), 40),  # one group, three ranks
        (32, 27, (4,), 8),  # conv 3×3 with 3 input channels, dense path (R ≥ in? no: out=32, in=27, R=4)
        (5, 300, (8, 8), 12),  # out < R: dense path
        (200, 3, (16, 16), 2),  # in < R
        (128, 128, (32, 32, 32, 32), 64),
        (64, 96, (4, 12), 8),  # same out/in, different input ranks: another group
    ]
    jobs = [
        random_job(gen, f"job{i}", out, inn, ranks, [1.0, -1.0, 0.5, -0.25][: len(ranks)], rank)
        for i, (out, inn, ranks, rank) in enumerate(specs)
    ]
    options = SvdOptions()
    result = run_ext(jobs, options)
    assert set(result.modules) == {job.name for job in jobs}
    for job in jobs:
        assert_matches_reference(job, result.modules[job.name], options)


@requires_ext
def test_empty_and_single_module():
    assert merge_jobs([], SvdOptions(), backend="ext").modules == {}
    gen = torch.Generator().manual_seed(2)
    job = random_job(gen, "only", 48, 80, (8, 8), [1.0, -1.0], 16, torch.float16)
    result = run_ext([job], SvdOptions())
    assert_matches_reference(job, result.modules["only"], SvdOptions())


@requires_ext
def test_cancelling_inputs_and_zero_modules():
    """B − A with B ≈ A (the copy-machine case) and an all-zero module, as in real files."""
    gen = torch.Generator().manual_seed(3)
    a = random_job(gen, "a", 320, 768, (8,), [1.0], 8)
    b_up = a.ups[0] + 1e-3 * torch.randn(a.ups[0].shape, generator=gen)
    b_down = a.downs[0] + 1e-3 * torch.randn(a.downs[0].shape, generator=gen)
    near = ModuleJob("near", [b_up, a.ups[0]], [b_down, a.downs[0]], [1.0, -1.0], 16)
    zero = ModuleJob("zero", [torch.zeros(320, 8), torch.zeros(320, 8)], [b_down, a.downs[0]], [1.0, -1.0], 16)
    options = SvdOptions()
    result = run_ext([near, zero], options)
    assert_matches_reference(near, result.modules["near"], options)
    merged = result.modules["zero"]
    assert torch.count_nonzero(merged.up) == 0 and torch.count_nonzero(merged.singular_values) == 0


def golden_jobs(folder, rank: int, conv_rank: int) -> list[ModuleJob]:
    """Every module of B − A in a golden folder (ratios 1, −1), as svd_merge_lora builds them."""
    b_file, a_file = read_lora(folder / "B.safetensors"), read_lora(folder / "A.safetensors")
    jobs = []
    for name, b in b_file.modules.items():
        a = a_file.modules[name]
        jobs.append(
            ModuleJob(
                name,
                [m.up.reshape(m.up.shape[0], -1) for m in (b, a)],
                [m.down.reshape(m.rank, -1) for m in (b, a)],
                [b.scale, -a.scale],
                conv_rank if b.kernel_size != (1, 1) else rank,
            )
        )
    return jobs


@requires_ext
@pytest.mark.parametrize(
    ("folder", "rank", "conv_rank"),
    [("real_sd15", 16, 16), ("real_sd15", 8, 8), ("sdxl_subset", 16, 16), ("synth_sd15_conv", 16, 8)],
)
def test_golden_modules(folder, rank, conv_rank):
    """The real inputs of every shared golden case, module by module, against the reference."""
    path = GOLDEN / folder
    if not path.is_dir():
        pytest.fail(f"reference data missing: {path}")
    jobs = golden_jobs(path, rank, conv_rank)
    options = SvdOptions()
    result = run_ext(jobs, options)
    for job in jobs:
        assert_matches_reference(job, result.modules[job.name], options)


def test_ci_built_the_extension():
    """CI sets COPYLORA_REQUIRE_EXT=1: there, a missing _C is a failure, not a fallback."""
    if os.environ.get("COPYLORA_REQUIRE_EXT") != "1":
        pytest.skip("COPYLORA_REQUIRE_EXT is not set (only CI requires the extension)")
    assert EXT.available, f"copylora._C did not load: {EXT.error}"


def test_doctor_says_which_backend(capsys):
    assert doctor.main([]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text
    if EXT.available:
        assert "copylora._C: built, CPU" in text and "--backend auto on cpu: ext (C++ CPU)" in text
    else:
        assert f"copylora._C: not loaded: {EXT.error}" in text
    broken = ops.ExtensionStatus(available=False, error="ImportError: undefined symbol")
    assert doctor.auto_choice(broken, "cpu") == "torch (copylora._C did not load: ImportError: undefined symbol)"
    cpu_only = ops.ExtensionStatus(available=True, cpu=True)
    assert doctor.auto_choice(cpu_only, "cuda") == "torch (copylora._C was built without CUDA kernels)"
