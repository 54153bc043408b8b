"""Every stock output in ../shared/golden/: our CLI on the same inputs must match it."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from copylora.merge import main as merge_main
from tests.conftest import golden_cases
from tests.lora_compare import assert_same_format, compare_deltas, module_deltas, read_metadata

CASES = golden_cases()

# From ../shared/README.md: the per-module relative Frobenius error allowed against stock.
MEDIAN_LIMIT, WORST_LIMIT = 1e-2, 6e-2


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(("folder", "case"), CASES, ids=[c["name"] for _, c in CASES])
def test_matches_stock(tmp_path, folder, case, backend):
    out = tmp_path / f"{case['name']}.safetensors"
    args = [a.replace("{DIR}", str(folder)) for a in case["args"]]
    assert merge_main([*args, "--save_to", str(out), "--backend", backend, "--quiet"]) == 0

    ref = folder / case["ref"]
    assert_same_format(out, ref)
    comparison = compare_deltas(module_deltas(load_file(str(out))), module_deltas(load_file(str(ref))))
    assert comparison.median <= MEDIAN_LIMIT, comparison.median
    assert comparison.worst <= WORST_LIMIT, (comparison.worst, max(comparison.errors, key=comparison.errors.get))

    metadata = read_metadata(out)
    inputs = [a for a in args if a.endswith(".safetensors")]
    titles = [read_metadata(Path(p)).get("modelspec.title") or Path(p).stem for p in inputs]
    expected_from = ", ".join(titles)
    assert metadata["modelspec.merged_from"] == expected_from
    assert metadata["modelspec.title"] == out.stem
    assert metadata["modelspec.implementation_version"].startswith("copylora/")
