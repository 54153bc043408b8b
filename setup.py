"""Builds copylora and, where it can, its extension copylora._C.

COPYLORA_BUILD_EXT=auto|cpu|cuda|none says what to build (copylora/runtime/extension_build.py explains
each). In the default, auto, the extension never blocks the install: a CUDA build that fails is
retried with CPU kernels only, a CPU build that fails (or no usable C++ compiler) installs without
the extension, and the build prints one line saying what it left out and why. What happened is
recorded in copylora/_build_info.json for `copylora doctor`.

Install with `pip install --no-build-isolation .` so the extension is built against the torch
that will import it.
"""

import contextlib
import glob
import os
import shlex
import subprocess
import sys
import tempfile
from importlib.machinery import EXTENSION_SUFFIXES

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, get_cxx_compiler

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
IS_WINDOWS = sys.platform == "win32"

# The build plan lives in the package, beside the code that reads its record (copylora doctor).
sys.path.insert(0, HERE)
from copylora.runtime.extension_build import (  # noqa: E402
    KERNEL_LABELS,
    MODE_VARIABLE,
    BuildFacts,
    BuildPlan,
    BuildRefused,
    Installer,
    first_error_line,
    plan_build,
    requirement,
    summarize,
)


def openmp_flags() -> list[str]:
    """-fopenmp at compile time when torch's own ATen runs on OpenMP (Linux wheels).

    at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`: without
    the flag it silently runs on one thread. Nothing is added at link time: the GOMP symbols
    resolve to the OpenMP runtime libtorch_cpu already loads, so there is only one thread pool.
    """
    backend_is_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if backend_is_openmp and sys.platform.startswith("linux") else []


def extension(kernels: str):
    """copylora._C with the CPU kernels, plus the CUDA kernels when kernels == "cuda"."""
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    debug = os.environ.get("COPYLORA_DEBUG") == "1"
    if IS_WINDOWS:  # MSVC's spelling of the same flags
        cxx_flags = ["/Od", "/Zi"] if debug else ["/O2"]
        cxx_flags += ["/std:c++20", "/DPy_LIMITED_API=0x03090000"]
    else:
        cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
        cxx_flags += ["-std=c++20", "-DPy_LIMITED_API=0x03090000", *openmp_flags()]
    common = dict(
        name="copylora._C",
        include_dirs=[os.path.join(HERE, CSRC)],
        py_limited_api=True,
    )
    if kernels == "cuda":
        return CUDAExtension(
            sources=cpp_sources + cuda_sources,
            # cuBLAS/cuSOLVER are reached through ATen (libtorch_cuda), so nothing else is linked.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            **common,
        )
    return CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)


def compiler_problem() -> str | None:
    """Why the C++ compiler torch's build calls cannot compile a one-line file; None when it can."""
    if IS_WINDOWS:
        from distutils.ccompiler import new_compiler  # setuptools' copy; finds MSVC or says why not

        try:
            new_compiler().initialize()
        except Exception as exc:  # DistutilsPlatformError: no Visual Studio Build Tools
            return str(exc)
        return None
    command = shlex.split(get_cxx_compiler())  # $CXX, else c++
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "probe.cpp")
        with open(source, "w") as file:
            file.write("int main() { return 0; }\n")
        try:
            result = subprocess.run(
                [*command, "-c", source, "-o", os.path.join(folder, "probe.o")], capture_output=True, text=True
            )
        except OSError as exc:
            return f"`{command[0]}` cannot be run ({exc.strerror})"
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip().splitlines()
        return f"`{shlex.join(command)}` exits {result.returncode} on a one-line C++ file" + (
            f" ({said[-1]})" if said else ""
        )
    return None


def build_facts() -> BuildFacts:
    mode = os.environ.get(MODE_VARIABLE, "auto").strip().lower() or "auto"
    return BuildFacts(
        mode=mode,
        require_ext=os.environ.get("COPYLORA_REQUIRE_EXT") == "1",
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_home=CUDA_HOME,
        cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") or None,
        visible_gpus=torch.cuda.device_count() if torch.version.cuda else 0,
        compiler_problem=None if mode == "none" else compiler_problem(),
    )


class CapturedOutput:
    """What the build printed while captured; the compiler writes to fd 1, so fds are redirected."""

    text = ""


@contextlib.contextmanager
def captured_output():
    """Capture fds 1 and 2 (to find the compiler's error line), then replay them unchanged."""
    captured = CapturedOutput()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            log.seek(0)
            data = log.read()
            with os.fdopen(os.dup(1), "wb") as stdout:
                stdout.write(data)
            captured.text = data.decode(errors="replace")


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """os.environ[name] = value for the block (nothing changes when value is None)."""
    if value is None:
        yield
        return
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def tell_user(line: str) -> None:
    """Print the build's one line where the user sees it: pip shows a build's output only with -v,
    so the line also goes to the terminal itself when there is one."""
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("CONOUT$" if IS_WINDOWS else "/dev/tty", "w", encoding="utf-8") as terminal:
            terminal.write(f"\n{line}\n")
    except OSError:
        pass  # no terminal (CI, a log file): stderr above is all there is


class BuildExtensionIfPossible(BuildExtension):
    """Builds the best kernel set the plan allows, falling back as it says, and records the outcome."""

    def run(self) -> None:
        facts = build_facts()
        try:
            plan = plan_build(facts)
        except BuildRefused as exc:
            raise SystemExit(f"copylora: error: {exc}") from None
        built, failures = "none", {}
        # build_ext.run() replaces the --compiler option with the compiler it made: each attempt starts afresh
        compiler_option = self.compiler
        for kernels in plan.attempts:
            self.compiler = compiler_option
            error = self.try_build(kernels, plan)
            if error is None:
                built = kernels
                break
            failures[kernels] = error
            if plan.must_build and kernels == plan.attempts[-1]:
                raise SystemExit(f"copylora: error: {requirement(facts)}: building {KERNEL_LABELS[kernels]} failed: {error}")
        if built == "none":
            self.extensions = []
            self.remove_stale_extensions()
        installer = Installer(python=sys.executable, source=HERE, editable=bool(self.inplace), windows=IS_WINDOWS)
        record = summarize(facts, built, failures, installer)
        record.save(self.package_folder())
        line = record.build_line()
        if line:
            tell_user(line)

    def try_build(self, kernels: str, plan: BuildPlan) -> str | None:
        """Build copylora._C with this kernel set; None on success, else the error in one line."""
        (ext,) = self.extensions
        # Re-point the Extension setuptools already registered (name and paths stay the same).
        for key, value in vars(extension(kernels)).items():
            if not key.startswith("_"):
                setattr(ext, key, value)
        arch_list = plan.cuda_arch_list if kernels == "cuda" else None
        with environment("TORCH_CUDA_ARCH_LIST", arch_list), captured_output() as output:
            try:
                super().run()
                return None
            except Exception as exc:  # noqa: BLE001 — any failure of this attempt; the plan says what next
                failure = exc
        said = str(failure).strip().splitlines()
        return first_error_line(output.text, said[-1] if said else type(failure).__name__)

    def package_folder(self) -> str:
        """Where copylora/ is installed from: the source tree when editable, else the build folder."""
        if self.inplace:
            return self.get_finalized_command("build_py").get_package_dir("copylora")
        return os.path.join(self.build_lib, "copylora")

    def remove_stale_extensions(self) -> None:
        """An earlier build's _C left in the build or source folder would contradict this build."""
        folders = {os.path.join(self.build_lib, "copylora"), self.package_folder()}
        for folder in folders:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(folder, "_C" + suffix)
                if os.path.exists(path):
                    os.remove(path)


setup(
    # (pyproject.toml's license table is deprecated in setuptools >= 77, its SPDX string is an
    # error before 77: kohya venvs have both, the plain keyword works in all)
    license="Apache-2.0",
    # the sd-scripts shim and the training presets ship inside the package, from their one
    # source each in sd_scripts_patch/ and configs/
    # every subpackage of copylora/, found (a new folder cannot be left out of a non-editable install)
    packages=[
        "copylora",
        *(f"copylora.{package}" for package in find_packages("copylora")),
        "copylora.sd_scripts_patch",
        "copylora.configs",
    ],
    package_dir={"copylora.sd_scripts_patch": "sd_scripts_patch", "copylora.configs": "configs"},
    package_data={"copylora.sd_scripts_patch": ["README.md"], "copylora.configs": ["*.toml"]},
    # the kernel set (CUDA, CPU, or none) is chosen when build_ext runs
    ext_modules=[extension("cpu")],
    cmdclass={"build_ext": BuildExtensionIfPossible},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
