"""The extension engine (copylora._C) against the pure-torch reference, on the CPU.

What must agree (tests/backend_compare.py says within what): singular values, the kept product
up @ down, each well-separated pair (the sign convention makes them unique), and stock's clamp.
test_cuda.py runs the same checks on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from copylora import doctor, engine
from copylora.engine import merge_jobs, ops, reference, resolve_backend
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from copylora.formats.lora_file import read_lora
from tests.backend_compare import EXT, assert_backend_matches, requires_ext
from tests.conftest import GoldenCase, golden_params


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def run_ext(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    result = merge_jobs(jobs, options, backend="ext", device="cpu")
    assert result.backend == "ext (C++ CPU)"
    return result.modules


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
    assert_backend_matches(jobs, options, run_ext)


def run_torch(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    result = merge_jobs(jobs, options, backend="torch", device="cpu")
    assert result.backend == "torch (cpu)"
    return result.modules


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    ranks=st.lists(st.integers(1, 40), min_size=1, max_size=4),  # one kept rank per module of the group
    dtype=st.sampled_from(DTYPES),
    clamp=st.sampled_from([0.99, 1.0, 0.3]),
    sqrt_split=st.booleans(),
    batch_floats=st.sampled_from([1, 1 << 22]),  # one module per batched call, or the whole group
    seed=st.integers(0, 2**31 - 1),
)
def test_batched_torch_backend_matches_one_module_at_a_time(shape, ranks, dtype, clamp, sqrt_split, batch_floats, seed):
    """The torch backend stacks each group into torch's batched QR/SVD; the reference runs alone."""
    gen = torch.Generator().manual_seed(seed)
    in_features = shape["in"] * (9 if shape["conv"] else 1)
    input_ranks = shape["input_ranks"]
    scales = [1.0, -1.0, 0.5, -2.0, 0.75][: len(input_ranks)]
    jobs = [random_job(gen, f"m{b}", shape["out"], in_features, input_ranks, scales, rank, dtype)
            for b, rank in enumerate(ranks)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "TORCH_BATCH_FLOATS", batch_floats)
        assert_backend_matches(jobs, SvdOptions(clamp_quantile=clamp, sqrt_split=sqrt_split), run_torch)


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
    assert_backend_matches(jobs, SvdOptions(), run_ext)


@pytest.mark.parametrize("backend", [pytest.param("ext", marks=requires_ext), "torch"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [SvdOptions(), SvdOptions(sqrt_split=True), SvdOptions(clamp_quantile=1.0)],
                         ids=["clamp", "clamp-sqrt-split", "no-clamp"])
def test_out_dtype_is_the_float32_result_rounded_once(backend, out_dtype, options):
    """merge_jobs(out_dtype=...) gives what .to(out_dtype) of its float32 result gives, on every
    path (the √S split included, which runs on the float32 result first)."""
    gen = torch.Generator().manual_seed(3)
    jobs = [random_job(gen, f"m{i}", 64, 96, (8, 8), [1.0, -1.0], 16, torch.float16) for i in range(3)]
    jobs.append(random_job(gen, "dense", 5, 300, (8, 8), [1.0, -1.0], 12))
    full = merge_jobs(jobs, options, backend=backend).modules
    rounded = merge_jobs(jobs, options, backend=backend, out_dtype=out_dtype).modules
    for name, merged in full.items():
        assert rounded[name].up.dtype == rounded[name].down.dtype == out_dtype
        assert torch.equal(rounded[name].up, merged.up.to(out_dtype))
        assert torch.equal(rounded[name].down, merged.down.to(out_dtype))
        assert torch.equal(rounded[name].singular_values, merged.singular_values)


@requires_ext
def test_empty_and_single_module():
    assert merge_jobs([], SvdOptions(), backend="ext").modules == {}
    gen = torch.Generator().manual_seed(2)
    job = random_job(gen, "only", 48, 80, (8, 8), [1.0, -1.0], 16, torch.float16)
    assert_backend_matches([job], SvdOptions(), run_ext)


BACKENDS = [pytest.param(run_ext, id="ext", marks=requires_ext), pytest.param(run_torch, id="torch")]


CONDITIONS = pytest.mark.parametrize("condition", [1e1, 1e3, 3e3, 1e4, 1e5, 1e8])


def ill_conditioned_jobs(condition: float) -> list[ModuleJob]:
    """Ups and downs with graded spectra (Cholesky-QR takes the well-conditioned ones and hands
    the rest to Householder; the threshold sits near 1e3)."""
    gen = torch.Generator().manual_seed(int(condition) % 1000)
    jobs = []
    for index, (out, in_features) in enumerate([(320, 320), (1280, 2048), (640, 5760)]):
        graded = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 16)
        basis_up = torch.linalg.qr(torch.randn(out, 16, generator=gen))[0]
        basis_down = torch.linalg.qr(torch.randn(in_features, 16, generator=gen))[0]
        up, down = basis_up * graded, (basis_down * graded.flip(0)).T
        jobs.append(ModuleJob(f"m{index}", [up[:, :8], up[:, 8:]], [down[:8], down[8:]], [1.0, -1.0], 16))
    return jobs


@pytest.mark.parametrize("run", BACKENDS)
@CONDITIONS
def test_ill_conditioned_factors(condition, run):
    assert_backend_matches(ill_conditioned_jobs(condition), SvdOptions(), run)


@pytest.mark.parametrize("run", BACKENDS)
def test_cancelling_inputs_and_zero_modules(run):
    """B − A with B ≈ A (the copy-machine case) and an all-zero module, as in real files."""
    gen = torch.Generator().manual_seed(3)
    a = random_job(gen, "a", 320, 768, (8,), [1.0], 8)
    b_up = a.ups[0] + 1e-3 * torch.randn(a.ups[0].shape, generator=gen)
    b_down = a.downs[0] + 1e-3 * torch.randn(a.downs[0].shape, generator=gen)
    near = ModuleJob("near", [b_up, a.ups[0]], [b_down, a.downs[0]], [1.0, -1.0], 16)
    zero = ModuleJob("zero", [torch.zeros(320, 8), torch.zeros(320, 8)], [b_down, a.downs[0]], [1.0, -1.0], 16)
    assert_backend_matches([near, zero], SvdOptions(), run)
    merged = run([zero], SvdOptions())["zero"]
    assert torch.count_nonzero(merged.up) == 0 and torch.count_nonzero(merged.singular_values) == 0


def golden_jobs(case: GoldenCase) -> list[ModuleJob]:
    """Every module of a golden case's B − A (ratios 1, −1) at its ranks, as svd_merge_lora builds them."""
    rank = int(case.option("--new_rank"))
    conv_rank = int(case.option("--new_conv_rank") or rank)
    b_path, a_path = case.inputs
    b_file, a_file = read_lora(b_path), read_lora(a_path)
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
@pytest.mark.parametrize("case", golden_params("golden"))
def test_golden_modules(case: GoldenCase):
    """The real inputs of every golden case, module by module, against the reference."""
    assert_backend_matches(golden_jobs(case), SvdOptions(), run_ext)


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
        assert "copylora._C: not " in text
    broken = ops.ExtensionStatus(available=False, error="ImportError: undefined symbol")
    assert doctor.auto_choice(broken, "cpu") == "torch (copylora._C: ImportError: undefined symbol)"
    cpu_only = ops.ExtensionStatus(available=True, cpu=True)
    assert doctor.auto_choice(cpu_only, "cuda") == "torch (copylora._C was built without CUDA kernels)"
    with_cuda = ops.ExtensionStatus(available=True, cpu=True, cuda=True)
    assert doctor.auto_choice(with_cuda, "cuda") == "ext (C++ CUDA)"


def test_auto_runs_the_cuda_kernel_where_it_was_built(monkeypatch, caplog):
    """The CUDA kernel passed bench/gpu_check.py on an H200: auto runs it, and nothing warns."""
    monkeypatch.setattr(ops, "load_status", lambda: ops.ExtensionStatus(available=True, cpu=True, cuda=True))
    caplog.clear()
    assert resolve_backend("auto", torch.device("cuda")) == "ext"
    assert resolve_backend("ext", torch.device("cuda")) == "ext"
    assert resolve_backend("auto", torch.device("cpu")) == "ext"
    assert caplog.records == []


def reversed_inputs(job: ModuleJob) -> ModuleJob:
    """The same W with its inputs stacked in the other order: another correct float32 rounding."""
    return ModuleJob(job.name, job.ups[::-1], job.downs[::-1], job.scales[::-1], job.rank)


def run_reference_reversed(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    return {job.name: reference.merge_module(reversed_inputs(job), options) for job in jobs}


def cancelling_jobs(count: int = 6) -> list[ModuleJob]:
    """B − A with B = A + a small change, ‖P‖‖Q‖/‖W‖ in the hundreds, as in real copy-machine pairs."""
    gen = torch.Generator().manual_seed(11)
    jobs = []
    for b in range(count):
        a = random_job(gen, f"a{b}", 320, 768, (8,), [1.0], 16)
        b_up = a.ups[0] + 3e-2 * torch.randn(a.ups[0].shape, generator=gen)
        b_down = a.downs[0] + 3e-2 * torch.randn(a.downs[0].shape, generator=gen)
        jobs.append(ModuleJob(f"m{b}", [b_up, a.ups[0]], [b_down, a.downs[0]], [1.0, -1.0], 16))
    return jobs


@pytest.mark.parametrize("clamp", [0.99, 1.0])
def test_comparison_accepts_another_correct_float32_rounding(clamp):
    """The reference itself, its inputs reversed, passes: the tolerance is what float32 allows."""
    assert_backend_matches(cancelling_jobs(), SvdOptions(clamp_quantile=clamp), run_reference_reversed)


@pytest.mark.parametrize(
    "case", golden_params("golden", where=lambda c: c.folder.name == "real_sd15" and c.option("--new_rank") == "16")
)
def test_comparison_accepts_reordered_real_pair(case: GoldenCase):
    """Every module of the real SD1.5 pair with its inputs reversed (68 of 264 failed a fixed 1e-5)."""
    assert_backend_matches(golden_jobs(case), SvdOptions(), run_reference_reversed)


@pytest.mark.parametrize(
    "damage",
    ["scale_up", "flip_sign", "wrong_level", "drop_pair", "singular_value"],
)
def test_comparison_rejects_wrong_results(damage):
    """A real error of 1e-3 (or a sign, or a clamp level) is caught, however cancelling the inputs."""

    def run_damaged(jobs, options):
        merged = {job.name: reference.merge_module(job, options) for job in jobs}
        m = merged[jobs[0].name]
        up, down, s = m.up.clone(), m.down.clone(), m.singular_values.clone()
        if damage == "scale_up":
            up *= 1.001
        elif damage == "flip_sign":
            up[:, 1], down[1] = -up[:, 1], -down[1]
        elif damage == "wrong_level" and options.clamps:
            level = up.abs().max() * 0.999
            up, down = up.clamp(-level, level), down.clamp(-level, level)
        elif damage == "drop_pair":
            up[:, 3], down[3] = 0.0, 0.0
        elif damage == "singular_value":
            s[0] *= 1.001
        merged[jobs[0].name] = MergedModule(up, down, s)
        return merged

    with pytest.raises(AssertionError):
        assert_backend_matches(cancelling_jobs(2), SvdOptions(), run_damaged)


def test_module_job_needs_one_scale_per_input():
    gen = torch.Generator().manual_seed(0)
    ups, downs = [torch.randn(8, 2, generator=gen)] * 2, [torch.randn(2, 6, generator=gen)] * 2
    with pytest.raises(ValueError, match="2 ups, 2 downs and 4 scales"):
        ModuleJob("m", ups, downs, [1.0, -1.0, 1.0, -1.0], 4)
    with pytest.raises(ValueError, match="1 downs"):
        ModuleJob("m", ups, downs[:1], [1.0, -1.0], 4)


# Tall cancelling modules like SD1.5's ff proj (10240 x 1280): MKL's QR of their P rounded
# differently on 1 and 2 threads before the kernel pinned its LAPACK calls to one MKL thread.
# Inputs of rank 8 (R = 16: Cholesky-QR) and 32 (R = 64: the Gram route).
THREAD_COUNT_RUN = """
import sys, torch
from copylora.engine import merge_jobs
from copylora.engine.jobs import ModuleJob, SvdOptions
gen = torch.Generator().manual_seed(0)
jobs = []
rank = int(sys.argv[2])
for b in range(6):
    up, down = torch.randn(10240, rank, generator=gen) * 0.02, torch.randn(rank, 1280, generator=gen) / 36
    near_up = up + 1e-3 * torch.randn(up.shape, generator=gen)
    near_down = down + 1e-3 * torch.randn(down.shape, generator=gen)
    jobs.append(ModuleJob(f"m{b}", [near_up, up], [near_down, down], [1.0, -1.0], 16))
merged = merge_jobs(jobs, SvdOptions(), backend="ext").modules
torch.save({name: (m.up, m.down, m.singular_values) for name, m in merged.items()}, sys.argv[1])
"""


@requires_ext
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to compare thread counts")
@pytest.mark.parametrize("rank", [8, 32])
def test_ext_result_does_not_depend_on_the_thread_count(tmp_path, rank):
    """README's guarantee: the ext backend on the CPU gives bit-identical results at any OMP_NUM_THREADS."""
    results = []
    for threads in (1, 2):
        path = tmp_path / f"threads{threads}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", THREAD_COUNT_RUN, str(path), str(rank)], env=env, check=True, timeout=300)
        results.append(torch.load(path))
    one, two = results
    assert one.keys() == two.keys()
    for name in one:
        for a, b in zip(one[name], two[name]):
            assert torch.equal(a, b), name


def test_jobs_that_form_their_factors_are_formed_a_batch_at_a_time(monkeypatch):
    """LoHa/LoKr jobs carry shapes and a `load`: the engine forms at most FORMED_BATCH_BYTES of
    factors, runs them, and only then forms the next batch; the results are the eager jobs'."""
    gen = torch.Generator().manual_seed(5)
    eager = [random_job(gen, f"m{i}", 96, 80, (8, 8), [1.0, -1.0], 8) for i in range(5)]
    events: list[str] = []

    def deferred(job: ModuleJob) -> ModuleJob:
        def load():
            events.append(f"form {job.name}")
            return job.ups, job.downs
        return ModuleJob(job.name, [u.to("meta") for u in job.ups], [d.to("meta") for d in job.downs],
                         job.scales, job.rank, load=load)

    original = engine._run_group_torch

    def logged(group, *args):
        events.append("run " + " ".join(job.name for job in group))
        return original(group, *args)

    monkeypatch.setattr(engine, "_run_group_torch", logged)
    monkeypatch.setattr(engine, "FORMED_BATCH_BYTES", 2 * eager[0].factor_bytes)
    lazy = merge_jobs([deferred(job) for job in eager], SvdOptions(), backend="torch").modules
    assert events == ["form m0", "form m1", "run m0 m1", "form m2", "form m3", "run m2 m3", "form m4", "run m4"]
    for name, merged in merge_jobs(eager, SvdOptions(), backend="torch").modules.items():
        torch.testing.assert_close(lazy[name].up, merged.up, rtol=0, atol=0)
        torch.testing.assert_close(lazy[name].down, merged.down, rtol=0, atol=0)
