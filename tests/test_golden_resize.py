"""Every stock resize_lora.py output (tests/data/golden-resize, ../shared/golden-resize): our CLI on the same inputs must match it.

"The same" (../shared/README.md, issue 10): same keys, shapes and dtypes; every alpha equal to
stock's, bit for bit; metadata equal to stock's except the sshs_* hashes, which must hash our
own bytes; per module the delta alpha / rank · up @ down within 1e-3 relative Frobenius error
(median) of stock's. There is no clamp in a resize, so only float rounding and the SVD's
tolerance separate two correct implementations.
"""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from copylora.resize import main as resize_main
from tests.conftest import GoldenCase, golden_params
from tests.lora_compare import assert_same_format, compare_deltas, module_deltas, read_metadata

MEDIAN_LIMIT = 1e-3
# measured: median 7e-6 to 1e-4, worst 8e-5 to 3e-4 over the four cases (ext and torch backends)
WORST_LIMIT = 1e-3


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", golden_params("golden-resize"))
def test_matches_stock(tmp_path, case: GoldenCase, backend):
    out = tmp_path / f"{case.name}.safetensors"
    assert resize_main([*case.args, "--save_to", str(out), "--quiet", "--backend", backend]) == 0
    ref = case.ref
    assert_same_format(out, ref)

    ours_md, ref_md = read_metadata(out), read_metadata(ref)
    assert {k: v for k, v in ours_md.items() if not k.startswith("sshs_")} == {
        k: v for k, v in ref_md.items() if not k.startswith("sshs_")
    }
    ours, theirs = load_file(str(out)), load_file(str(ref))
    for key in theirs:
        if key.endswith(".alpha"):
            assert ours[key].dtype == theirs[key].dtype and ours[key].equal(theirs[key]), key
        elif ".lora_" not in key:
            assert ours[key].equal(theirs[key]), key  # passed through, cast like stock

    comparison = compare_deltas(module_deltas(ours), module_deltas(theirs))
    assert comparison.median <= MEDIAN_LIMIT, comparison.median
    assert comparison.worst <= WORST_LIMIT, (comparison.worst, max(comparison.errors, key=comparison.errors.get))
