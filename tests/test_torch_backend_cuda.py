"""The torch backend on a GPU against the reference (skipped without one).

It is what `--device cuda` runs where copylora._C has no CUDA kernels (a Kohya's GUI install has
no nvcc), so it needs no extension. Batched per shape group: Cholesky-QR below R = 64, the Gram
route from it (cuSOLVER's Householder QR where they fail), cuSOLVER's SVD.
"""

from __future__ import annotations

import pytest
import torch

from copylora.engine import merge_jobs
from copylora.engine.jobs import MergedModule, ModuleJob, SvdOptions
from tests.backend_compare import assert_backend_matches
from tests.conftest import GoldenCase, golden_params
from tests.test_cuda import CORE_SIZES, core_size_jobs
from tests.test_engine import CONDITIONS, cancelling_jobs, golden_jobs, ill_conditioned_jobs
from tests.test_gram_route import spy_on_gram, well_conditioned_jobs, zero_and_deficient_jobs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def run_torch_cuda(jobs: list[ModuleJob], options: SvdOptions) -> dict[str, MergedModule]:
    result = merge_jobs(jobs, options, backend="torch", device="cuda")
    assert result.backend == "torch (cuda)"
    return result.modules


@CORE_SIZES
def test_core_sizes(input_ranks):
    assert_backend_matches(core_size_jobs(input_ranks), SvdOptions(), run_torch_cuda)


@pytest.mark.parametrize("case", golden_params("golden"))
def test_golden_modules(case: GoldenCase):
    assert_backend_matches(golden_jobs(case), SvdOptions(), run_torch_cuda)


def test_cancelling_pairs():
    assert_backend_matches(cancelling_jobs(), SvdOptions(), run_torch_cuda)


@CONDITIONS
def test_ill_conditioned_factors(condition):
    assert_backend_matches(ill_conditioned_jobs(condition), SvdOptions(), run_torch_cuda)


def test_gram_route_on_cuda(monkeypatch):
    """From R = 64 the Gram route, as on the CPU: it takes the cancelling pairs and hands the zero and
    the rank-deficient module of the same batch to Cholesky-QR and Householder."""
    accepted = spy_on_gram(monkeypatch)
    assert_backend_matches(zero_and_deficient_jobs() + well_conditioned_jobs(32, 1e-3), SvdOptions(), run_torch_cuda)
    taken = torch.cat(accepted).cpu()
    assert taken.sum().item() >= 6 and taken.logical_not().sum().item() >= 2
