import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"
MANIFESTS = SHARED / "kohya" / "manifests"


def golden_cases() -> list[tuple[Path, dict]]:
    """(folder, case) for every case in ../shared/golden/*/cases.json."""
    cases = []
    for cases_file in sorted(GOLDEN.glob("*/cases.json")):
        for case in json.loads(cases_file.read_text()):
            cases.append((cases_file.parent, case))
    return cases


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference data missing: {SHARED} (CI and developers have it beside the repo)")
    return SHARED
