"""What setup.py builds of copylora._C, and the record of it that `copylora doctor` reads.

setup.py gathers BuildFacts, asks plan_build() which kernel sets to try (best first), tries them,
and writes summarize()'s BuildRecord beside the package as _build_info.json. Kernel sets: "cuda"
(CPU and CUDA kernels), "cpu" (CPU kernels), "none" (no extension: the pure-torch backend).

The switch a user types, COPYLORA_BUILD_EXT:
  auto  (default) CUDA kernels too when torch has CUDA and nvcc is found; a CUDA build that
        fails is retried CPU-only, a CPU build that fails installs without the extension —
        the extension never blocks the install, and the build says in one line what it left out.
  cpu   CPU kernels only; the install fails if they cannot be built.
  cuda  CPU and CUDA kernels; the install fails if they cannot be built.
  none  no extension.
COPYLORA_REQUIRE_EXT=1 makes `auto` fail rather than install without the extension (CI).

Nothing here imports torch or setuptools: the decisions are plain functions of the facts.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from copylora.runtime import shell_words

MODES = ("auto", "cpu", "cuda", "none")
MODE_VARIABLE = "COPYLORA_BUILD_EXT"
RECORD_NAME = "_build_info.json"

# Without a GPU to ask, torch cannot pick CUDA architectures (it fails on an empty list). These
# cover Turing to Hopper, which CUDA 12 and 13 both compile, plus PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"

KERNEL_LABELS = {"cuda": "CPU and CUDA kernels", "cpu": "CPU kernels", "none": "no extension"}

INSTALL_COMPILER = (
    "install a C++ compiler (Windows: Visual Studio Build Tools, workload \"Desktop development with C++\"; "
    "Linux: g++; macOS: xcode-select --install)"
)
FIX_BUILD_ERROR = "fix that error (`pip install -v` shows the compiler's whole output)"


class BuildRefused(Exception):
    """An explicit request (COPYLORA_BUILD_EXT=cpu|cuda, COPYLORA_REQUIRE_EXT=1) that cannot be met."""


@dataclass(frozen=True)
class BuildFacts:
    """What the build machine offers, as setup.py found it."""

    mode: str  # COPYLORA_BUILD_EXT
    require_ext: bool  # COPYLORA_REQUIRE_EXT=1
    torch_version: str
    torch_cuda: str | None  # torch.version.cuda: None for a CPU build of torch
    cuda_home: str | None  # the CUDA toolkit torch's build helpers found (None: no nvcc)
    cuda_arch_list: str | None  # TORCH_CUDA_ARCH_LIST
    visible_gpus: int
    compiler_problem: str | None  # why the C++ compiler does not work; None when it does

    @property
    def best_kernels(self) -> str:
        """The most this torch can run: CUDA kernels need a CUDA build of torch."""
        return "cuda" if self.torch_cuda else "cpu"

    def cuda_problem(self) -> str | None:
        if self.torch_cuda is None:
            return f"torch {self.torch_version} is a CPU-only build"
        if self.cuda_home is None:
            return "no CUDA toolkit found (nvcc; set CUDA_HOME or put nvcc on PATH)"
        return None


@dataclass(frozen=True)
class BuildPlan:
    attempts: tuple[str, ...]  # kernel sets to try, best first; empty: build nothing
    cuda_arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST to set for the CUDA attempt
    must_build: bool = False  # the last attempt failing fails the install


def plan_build(facts: BuildFacts) -> BuildPlan:
    """Which kernel sets to try; raises BuildRefused for an explicit request that cannot be met."""
    mode = facts.mode
    if mode not in MODES:
        raise BuildRefused(f"{MODE_VARIABLE}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return BuildPlan(attempts=())
    must_build = mode != "auto" or facts.require_ext
    if facts.compiler_problem:
        if must_build:
            raise BuildRefused(f"{requirement(facts)} needs a C++ compiler: {facts.compiler_problem}")
        return BuildPlan(attempts=())
    cuda_problem = facts.cuda_problem()
    if mode == "cuda" and cuda_problem:
        raise BuildRefused(f"{MODE_VARIABLE}=cuda: {cuda_problem}")
    if mode == "cpu" or cuda_problem:
        return BuildPlan(attempts=("cpu",), must_build=must_build)
    # torch picks the architectures of the visible GPUs; with none visible it has nothing to pick
    arch_list = DEFAULT_CUDA_ARCH_LIST if not facts.cuda_arch_list and facts.visible_gpus == 0 else None
    attempts = ("cuda",) if mode == "cuda" else ("cuda", "cpu")
    return BuildPlan(attempts=attempts, cuda_arch_list=arch_list, must_build=must_build)


def requirement(facts: BuildFacts) -> str:
    return "COPYLORA_REQUIRE_EXT=1" if facts.mode == "auto" else f"{MODE_VARIABLE}={facts.mode}"


@dataclass(frozen=True)
class Installer:
    """How copylora was installed, so the command that rebuilds it can be written out exactly."""

    python: str  # the interpreter pip ran the build with
    source: str  # the folder setup.py was in
    editable: bool
    windows: bool

    def command(self, kernels: str) -> str:
        """The command that reinstalls copylora with COPYLORA_BUILD_EXT=kernels."""
        quote = functools.partial(shell_words.quote, windows=self.windows)
        # pip builds from a temporary copy when installing from an archive or URL: then name the folder
        source = quote(self.source) if Path(self.source).is_dir() else "<copylora source folder>"
        pip = f"{quote(self.python)} -m pip install --no-build-isolation {'-e ' if self.editable else ''}{source}"
        if self.windows:
            return f'$env:{MODE_VARIABLE}="{kernels}"; & {pip}'
        return f"{MODE_VARIABLE}={kernels} {pip}"


@dataclass(frozen=True)
class BuildRecord:
    """What one build of copylora did, saved beside the package for `copylora doctor`."""

    requested: str  # COPYLORA_BUILD_EXT
    built: str  # "cuda", "cpu" or "none"
    torch_version: str  # the torch it was built against
    installer: Installer
    missing: str | None = None  # the kernel set this torch could run but did not get
    why: str | None = None  # why it was not built
    fix: str | None = None  # what to do before running the command

    def rebuild_line(self) -> str:
        """What to run to get the missing kernels."""
        assert self.missing is not None
        command = self.installer.command(self.missing)
        return f"{self.fix}, then: {command}" if self.fix else command

    def build_line(self) -> str | None:
        """The one line the build prints when it leaves something out."""
        if self.missing is None:
            return None
        if self.built == "none":
            return (
                f"copylora: installing without its C++ extension (copylora._C): {self.why}. "
                "Merges run on the pure-torch backend; `copylora doctor` says how to build it."
            )
        return (
            f"copylora: building copylora._C without CUDA kernels: {self.why}. "
            "CUDA merges run on the pure-torch backend; `copylora doctor` says how to build them."
        )

    def save(self, folder: Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / RECORD_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> BuildRecord | None:
        """The record in folder, or None when there is none (or it is unreadable)."""
        try:
            data = json.loads((Path(folder) / RECORD_NAME).read_text(encoding="utf-8"))
            return cls(**{**data, "installer": Installer(**data["installer"])})
        except (OSError, ValueError, TypeError, KeyError):
            return None


def summarize(facts: BuildFacts, built: str, failures: dict[str, str], installer: Installer) -> BuildRecord:
    """The record of a build that ended with `built`; failures maps each failed kernel set to its error."""
    record = BuildRecord(requested=facts.mode, built=built, torch_version=facts.torch_version, installer=installer)
    if built == facts.best_kernels:
        return record
    # the kernel set whose absence explains the result: the CPU kernels when nothing was built
    absent = "cpu" if built == "none" else "cuda"
    fix = None
    if facts.mode in ("none", "cpu"):
        why = f"{MODE_VARIABLE}={facts.mode}"
    elif absent in failures:
        why = f"the {'CUDA' if absent == 'cuda' else 'C++'} build failed: {failures[absent]}"
        fix = FIX_BUILD_ERROR
    elif absent == "cpu":
        why = f"no usable C++ compiler: {facts.compiler_problem}"
        fix = INSTALL_COMPILER
    else:
        why = facts.cuda_problem() or "the CUDA kernels were not attempted"
        fix = f"install the CUDA {(facts.torch_cuda or '').split('.')[0]} toolkit (nvcc) or set CUDA_HOME to it"
    return replace(record, missing=facts.best_kernels, why=why, fix=fix)


# gcc/clang/nvcc "error:", MSVC "error C1083:", distutils "error: command ... failed"
ERROR_LINE = re.compile(r"\berror( C\d+)?:", re.IGNORECASE)


def first_error_line(output: str, fallback: str) -> str:
    """The compiler's first error line in a build's output (e.g. a missing header), else fallback."""
    for line in output.splitlines():
        if ERROR_LINE.search(line):
            return line.strip()
    return fallback
