"""The Gram route of the factored SVD (issue 22): taken where R is large, declined where the factors
are too ill-conditioned for it, and within the engine tests' float32 bounds either way.

Both batched backends: the C++ kernel (copylora::factored_svd runs the decomposition merge_group
runs, and says which route each module took) and the torch backend (reference.batch_thin_svd).
"""

from __future__ import annotations

import pytest
import torch

from copylora.engine import merge_jobs, reference
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from tests.backend_compare import assert_backend_matches, requires_ext


DENSE, GRAM, CHOLESKY_QR, HOUSEHOLDER = 0, 1, 2, 3  # the op's route codes (csrc/copylora.cpp)


def pair_job(gen: torch.Generator, name: str, out: int, in_features: int, rank_each: int, change: float | None,
             rank: int = 16) -> ModuleJob:
    """B − A of two LoRAs of rank_each; B = A + change·noise (a copy-machine pair), or independent."""
    up_a = torch.randn(out, rank_each, generator=gen) * 0.02
    down_a = torch.randn(rank_each, in_features, generator=gen) / in_features**0.5
    if change is None:
        up_b = torch.randn(out, rank_each, generator=gen) * 0.02
        down_b = torch.randn(rank_each, in_features, generator=gen) / in_features**0.5
    else:
        up_b = up_a + change * 0.02 * torch.randn(up_a.shape, generator=gen)
        down_b = down_a + change / in_features**0.5 * torch.randn(down_a.shape, generator=gen)
    return ModuleJob(name, [up_b.half(), up_a.half()], [down_b.half(), down_a.half()], [1.0, -1.0], rank)


def well_conditioned_jobs(rank_each: int = 32, change: float | None = None) -> list[ModuleJob]:
    gen = torch.Generator().manual_seed(rank_each)
    shapes = [(320, 768), (1280, 640), (3072, 1024)]
    return [pair_job(gen, f"m{i}_{b}", out, in_features, rank_each, change)
            for i, (out, in_features) in enumerate(shapes) for b in range(2)]


def zero_and_deficient_jobs() -> list[ModuleJob]:
    """An all-zero module and one whose two inputs are the same LoRA twice (rank-deficient P, Q)."""
    gen = torch.Generator().manual_seed(9)
    up, down = torch.randn(320, 32, generator=gen), torch.randn(32, 768, generator=gen)
    twice = ModuleJob("twice", [up, up], [down, down], [1.0, 0.5], 16)
    zero = ModuleJob("zero", [torch.zeros(320, 32)] * 2, [down, down], [1.0, -1.0], 16)
    return [twice, zero]


def routes(jobs: list[ModuleJob], method: str = "auto") -> list[int]:
    """The route the C++ kernel takes for each job (each alone: its own batch)."""
    taken = []
    for job in jobs:
        p, q = reference.stacked_factors(job)
        taken.append(int(torch.ops.copylora.factored_svd(p[None], q[None], job.rank, method)[3][0]))
    return taken


def run_ext(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    return merge_jobs(jobs, options, backend="ext").modules


def run_torch(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    return merge_jobs(jobs, options, backend="torch").modules


@requires_ext
@pytest.mark.parametrize("rank_each", [32, 64])
@pytest.mark.parametrize("change", [None, 3e-2, 1e-3], ids=["independent", "cancelling-3e-2", "cancelling-1e-3"])
def test_ext_takes_the_gram_route_from_r64_and_matches(rank_each, change):
    jobs = well_conditioned_jobs(rank_each, change)
    assert routes(jobs) == [GRAM] * len(jobs)
    assert_backend_matches(jobs, SvdOptions(), run_ext)


@requires_ext
def test_ext_keeps_cholesky_qr_below_r64():
    jobs = well_conditioned_jobs(16)
    assert routes(jobs) == [CHOLESKY_QR] * len(jobs)
    assert routes(jobs, "gram") == [GRAM] * len(jobs)  # forced, it is still right
    p, q = reference.stacked_factors(jobs[0])
    u, s, vh, _ = torch.ops.copylora.factored_svd(p[None], q[None], 16, "gram")
    u_ref, s_ref, vh_ref, _ = torch.ops.copylora.factored_svd(p[None], q[None], 16, "qr")
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(u * s[..., None, :16], u_ref * s_ref[..., None, :16], rtol=0, atol=1e-5 * float(s_ref[0, 0]))


@requires_ext
def test_ext_householder_when_asked():
    """The 'householder' method (the CUDA kernel's QR before issue 22, kept to time against)."""
    jobs = well_conditioned_jobs(32, 1e-3)
    assert routes(jobs, "householder") == [HOUSEHOLDER] * len(jobs)
    p, q = reference.stacked_factors(jobs[0])
    _, s, _, _ = torch.ops.copylora.factored_svd(p[None], q[None], 16, "householder")
    _, s_ref, _, _ = torch.ops.copylora.factored_svd(p[None], q[None], 16, "qr")
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)


@requires_ext
def test_ext_declines_what_the_gram_route_cannot_factor():
    """Zero and rank-deficient modules fail the float64 Cholesky: Householder, as before."""
    jobs = zero_and_deficient_jobs()
    assert routes(jobs, "gram") == [HOUSEHOLDER, HOUSEHOLDER]
    assert_backend_matches(jobs, SvdOptions(), run_ext)


@requires_ext
@pytest.mark.parametrize("condition", [1e2, 1e4, 1e6, 1e8])
def test_ext_graded_factors_are_right_on_whichever_route(condition):
    """Ups and downs with graded spectra at R = 64: the Gram route takes the milder ones, CholQR2 or
    Householder the rest, and every result is within the bounds."""
    gen = torch.Generator().manual_seed(int(condition) % 997)
    jobs = []
    for index, (out, in_features) in enumerate([(320, 768), (1280, 2048)]):
        graded = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), 64)
        basis_up = torch.linalg.qr(torch.randn(out, 64, generator=gen))[0]
        basis_down = torch.linalg.qr(torch.randn(in_features, 64, generator=gen))[0]
        up, down = basis_up * graded, (basis_down * graded.flip(0)).T
        jobs.append(ModuleJob(f"m{index}", [up[:, :32], up[:, 32:]], [down[:32], down[32:]], [1.0, -1.0], 16))
    taken = routes(jobs)
    assert set(taken) <= {GRAM, CHOLESKY_QR, HOUSEHOLDER}
    if condition <= 1e2:
        assert taken == [GRAM, GRAM]
    assert_backend_matches(jobs, SvdOptions(), run_ext)


@requires_ext
def test_factored_svd_refuses_bad_arguments():
    p, q = torch.randn(2, 64, 8), torch.randn(2, 8, 96)
    with pytest.raises(RuntimeError, match="method must be"):
        torch.ops.copylora.factored_svd(p, q, 4, "cholesky")
    with pytest.raises(RuntimeError, match="must be \\(B, out, R\\)"):
        torch.ops.copylora.factored_svd(p, q[:1], 4, "auto")


def spy_on_gram(monkeypatch) -> list[torch.Tensor]:
    """Records what reference.gram_thin_svd accepted, each call."""
    accepted: list[torch.Tensor] = []
    original = reference.gram_thin_svd

    def recording(p, q, kept):
        result = original(p, q, kept)
        accepted.append(result[3])
        return result

    monkeypatch.setattr(reference, "gram_thin_svd", recording)
    return accepted


@pytest.mark.parametrize("change", [None, 1e-3], ids=["independent", "cancelling-1e-3"])
def test_torch_backend_takes_the_gram_route_from_r64_and_matches(monkeypatch, change):
    accepted = spy_on_gram(monkeypatch)
    jobs = well_conditioned_jobs(32, change)
    assert_backend_matches(jobs, SvdOptions(), run_torch)
    assert accepted and all(bool(a.all()) for a in accepted)


def test_torch_backend_keeps_cholesky_qr_below_r64(monkeypatch):
    accepted = spy_on_gram(monkeypatch)
    assert_backend_matches(well_conditioned_jobs(16), SvdOptions(), run_torch)
    assert accepted == []


def test_torch_backend_redoes_what_the_gram_route_declines(monkeypatch):
    """One batch (R = 64, 320 × 768): a good module beside the zero and the rank-deficient one."""
    accepted = spy_on_gram(monkeypatch)
    jobs = zero_and_deficient_jobs() + well_conditioned_jobs(32)[:1]
    assert_backend_matches(jobs, SvdOptions(), run_torch)
    declined = torch.cat(accepted).logical_not().sum().item()
    assert declined >= 2  # the zero and the rank-deficient module, in every run
