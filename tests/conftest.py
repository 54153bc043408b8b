"""Where the tests' reference data is, and what a test does when it is not there.

All of it was written by the real stock kohya scripts (sd-scripts 48d368fa). Two places:

- tests/data/ (in the repo, so always there): kohya's option dumps and module manifests, and
  compact golden cases — the real SD1.5 pair and the LoCon case cut to a few modules, the SDXL
  subset whole. tests/data/README.md says where each file came from.
- ../shared/ (beside the repo on the project's machines and in CI): the full golden data. Tests
  on it run when it is there and skip with a reason when it is not; with
  COPYLORA_REQUIRE_SHARED=1 (.ci/run sets it) a missing ../shared is a failure instead.

Golden folders, ../shared/README.md's layout: `golden/<name>/cases.json` for svd_merge_lora.py,
`golden-resize/<name>/cases.json` for resize_lora.py, each case `{"name", "args", "ref"}`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared"
REQUIRE_SHARED = "COPYLORA_REQUIRE_SHARED"

GoldenKind = Literal["golden", "golden-resize"]


def kohya_file(name: str) -> Path:
    """kohya's interface facts (vendored): `svd_merge_lora_args.json`, `manifests/sd15.json`, ..."""
    return DATA / "kohya" / name


def require_shared(relative: str) -> Path:
    """../shared/<relative>; where it is missing, skip — or fail under COPYLORA_REQUIRE_SHARED=1."""
    path = SHARED / relative
    if not path.exists():
        reason = f"needs the full reference data {path} (absent; a bare clone tests the compact cases in tests/data)"
        if os.environ.get(REQUIRE_SHARED) == "1":
            pytest.fail(f"{reason}; {REQUIRE_SHARED}=1 requires it", pytrace=False)
        pytest.skip(reason)
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs_shared"):
        require_shared(*marker.args)


def _sliced_files() -> set[str]:
    sources = DATA / "sources.json"
    if not sources.is_file():
        raise FileNotFoundError(f"{sources} is missing: tests/data is part of the repo (regenerate: tests/data/README.md)")
    return {name for name, entry in json.loads(sources.read_text())["files"].items() if entry["modules"] is not None}


SLICED_FILES = _sliced_files()


@dataclass(frozen=True)
class GoldenFolder:
    """One folder of stock outputs: cases.json, and the inputs and outputs it names."""

    kind: GoldenKind
    path: Path
    origin: Literal["data", "shared"]
    # Cut to some modules (tests/data only): tensors and metadata are stock's, but whole-file facts —
    # the sshs_* hashes, anything about the modules left out — describe the uncut file.
    sliced: bool

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def id(self) -> str:
        return f"{self.origin}:{self.name}"

    def cases(self) -> list[GoldenCase]:
        return [GoldenCase(case["name"], self, tuple(a.replace("{DIR}", str(self.path)) for a in case["args"]),
                           self.path / case["ref"])
                for case in json.loads((self.path / "cases.json").read_text())]


@dataclass(frozen=True)
class GoldenCase:
    """Stock's arguments ({DIR} filled in, --save_to left out) and the file stock wrote with them."""

    name: str
    folder: GoldenFolder
    args: tuple[str, ...]
    ref: Path

    @property
    def id(self) -> str:
        return f"{self.folder.origin}:{self.name}"

    @property
    def inputs(self) -> list[Path]:
        return [Path(a) for a in self.args if a.endswith(".safetensors")]

    def option(self, flag: str) -> str | None:
        """The value given for flag, or None where stock ran without it."""
        return self.args[self.args.index(flag) + 1] if flag in self.args else None


def golden_folder(kind: GoldenKind, name: str) -> GoldenFolder:
    """The vendored folder tests/data/<kind>/<name>."""
    path = DATA / kind / name
    if not (path / "cases.json").is_file():
        raise FileNotFoundError(f"{path / 'cases.json'} is missing (tests/data is part of the repo)")
    return GoldenFolder(kind, path, "data", sliced=any(f.startswith(f"{kind}/{name}/") for f in SLICED_FILES))


def golden_folders(kind: GoldenKind) -> list[GoldenFolder]:
    """The vendored folders, then every ../shared folder not vendored whole (present ones only)."""
    vendored = [golden_folder(kind, p.parent.name) for p in sorted((DATA / kind).glob("*/cases.json"))]
    if not vendored:
        raise FileNotFoundError(f"no {DATA / kind}/*/cases.json (tests/data is part of the repo)")
    whole = {folder.name for folder in vendored if not folder.sliced}
    full = [GoldenFolder(kind, p.parent, "shared", sliced=False)
            for p in sorted((SHARED / kind).glob("*/cases.json")) if p.parent.name not in whole]
    return vendored + full


def golden_params(kind: GoldenKind = "golden", per: Literal["case", "folder"] = "case",
                  where: Callable[[GoldenCase | GoldenFolder], bool] | None = None) -> list:
    """pytest parameters: every golden case (or folder), vendored and full, with ids like
    `data:real_sd15_r16` / `shared:real_sd15_r16`. Where ../shared/<kind> is missing, one
    `shared:<kind>` parameter stands for the full cases and skips (or fails, see require_shared)."""
    folders = golden_folders(kind)
    items = folders if per == "folder" else [case for folder in folders for case in folder.cases()]
    params = [pytest.param(item, id=item.id) for item in items if where is None or where(item)]
    if not (SHARED / kind).is_dir():
        params.append(pytest.param(None, id=f"shared:{kind}", marks=pytest.mark.needs_shared(kind)))
    if not params:
        raise ValueError(f"no {kind} {per} matches: a golden test must not collect nothing")
    return params
