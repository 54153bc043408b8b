"""Every stock svd_merge_lora.py output (tests/data/golden, ../shared/golden): our CLI on the same inputs must match it."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from copylora.merge import main as merge_main
from tests.conftest import GoldenCase, golden_params
from tests.lora_compare import assert_same_format, compare_deltas, module_deltas, read_metadata

# From ../shared/README.md: the per-module relative Frobenius error allowed against stock.
MEDIAN_LIMIT, WORST_LIMIT = 1e-2, 6e-2


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", golden_params("golden"))
def test_matches_stock(tmp_path, case: GoldenCase, backend):
    out = tmp_path / f"{case.name}.safetensors"
    assert merge_main([*case.args, "--save_to", str(out), "--backend", backend, "--quiet"]) == 0

    assert_same_format(out, case.ref)
    comparison = compare_deltas(module_deltas(load_file(str(out))), module_deltas(load_file(str(case.ref))))
    assert comparison.median <= MEDIAN_LIMIT, comparison.median
    assert comparison.worst <= WORST_LIMIT, (comparison.worst, max(comparison.errors, key=comparison.errors.get))

    metadata = read_metadata(out)
    titles = [read_metadata(p).get("modelspec.title") or p.stem for p in case.inputs]
    expected_from = ", ".join(titles)
    assert metadata["modelspec.merged_from"] == expected_from
    assert metadata["modelspec.title"] == out.stem
    assert metadata["modelspec.implementation_version"].startswith("copylora/")
