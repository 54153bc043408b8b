"""Building copylora._C: the plan for each machine, the record it leaves, and what doctor and
`--backend auto` say about it. The facts are fed in, so every machine is covered on this one;
.ci/run installs for real with a compiler that exits 1 (the end-to-end check)."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from copylora import doctor
from copylora.engine import ops, resolve_backend, warn_once
from copylora.runtime.extension_build import (
    DEFAULT_CUDA_ARCH_LIST,
    FIX_BUILD_ERROR,
    INSTALL_COMPILER,
    RECORD_NAME,
    BuildFacts,
    BuildPlan,
    BuildRecord,
    BuildRefused,
    Installer,
    first_error_line,
    plan_build,
    summarize,
)

CPU_TORCH = BuildFacts(
    mode="auto",
    require_ext=False,
    torch_version="2.13.0+cpu",
    torch_cuda=None,
    cuda_home=None,
    cuda_arch_list=None,
    visible_gpus=0,
    compiler_problem=None,
)
# a kohya venv: CUDA torch, nvcc installed, no GPU visible (a build box, a container, WSL without passthrough)
CUDA_TORCH_NO_GPU = dataclasses.replace(CPU_TORCH, torch_version="2.14.1", torch_cuda="13.0", cuda_home="/usr/local/cuda")
NO_COMPILER = "`c++` exits 1 on a one-line C++ file"
CUSPARSE = "merge_group_cuda.cu:12:10: fatal error: cusparse.h: No such file or directory"


def facts(base: BuildFacts = CPU_TORCH, **changes) -> BuildFacts:
    return dataclasses.replace(base, **changes)


@pytest.fixture
def installer(tmp_path) -> Installer:
    return Installer(python="/venv/bin/python", source=str(tmp_path), editable=False, windows=False)


# --- the plan ---------------------------------------------------------------------------------


def test_cpu_torch_builds_the_cpu_kernels():
    assert plan_build(CPU_TORCH) == BuildPlan(attempts=("cpu",))


def test_cuda_torch_without_a_gpu_gets_a_default_arch_list_and_a_cpu_retry():
    """torch picks the architectures of visible GPUs; with none it failed on an empty list."""
    assert plan_build(CUDA_TORCH_NO_GPU) == BuildPlan(attempts=("cuda", "cpu"), cuda_arch_list=DEFAULT_CUDA_ARCH_LIST)


def test_cuda_arch_list_is_left_to_torch_or_the_user_when_it_has_one():
    assert plan_build(facts(CUDA_TORCH_NO_GPU, visible_gpus=1)).cuda_arch_list is None
    assert plan_build(facts(CUDA_TORCH_NO_GPU, cuda_arch_list="8.6")).cuda_arch_list is None


def test_cuda_torch_without_nvcc_builds_cpu_kernels():
    assert plan_build(facts(CUDA_TORCH_NO_GPU, cuda_home=None)) == BuildPlan(attempts=("cpu",))


def test_no_compiler_builds_nothing_in_auto():
    assert plan_build(facts(compiler_problem=NO_COMPILER)) == BuildPlan(attempts=())
    assert plan_build(facts(CUDA_TORCH_NO_GPU, compiler_problem=NO_COMPILER)) == BuildPlan(attempts=())


def test_explicit_switches():
    assert plan_build(facts(mode="none")) == BuildPlan(attempts=())
    assert plan_build(facts(CUDA_TORCH_NO_GPU, mode="cpu")) == BuildPlan(attempts=("cpu",), must_build=True)
    cuda_only = plan_build(facts(CUDA_TORCH_NO_GPU, mode="cuda"))
    assert cuda_only == BuildPlan(attempts=("cuda",), cuda_arch_list=DEFAULT_CUDA_ARCH_LIST, must_build=True)
    assert plan_build(facts(require_ext=True)).must_build


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(mode="gpu"), "COPYLORA_BUILD_EXT='gpu': use one of auto, cpu, cuda, none"),
        (dict(mode="cpu", compiler_problem=NO_COMPILER), f"COPYLORA_BUILD_EXT=cpu needs a C++ compiler: {NO_COMPILER}"),
        (dict(require_ext=True, compiler_problem=NO_COMPILER), "COPYLORA_REQUIRE_EXT=1 needs a C++ compiler"),
        (dict(mode="cuda"), "COPYLORA_BUILD_EXT=cuda: torch 2.13.0+cpu is a CPU-only build"),
    ],
)
def test_explicit_requests_that_cannot_be_met_are_refused(changes, message):
    with pytest.raises(BuildRefused, match=re.escape(message)):
        plan_build(facts(**changes))


def test_cuda_switch_without_nvcc_is_refused():
    with pytest.raises(BuildRefused, match="no CUDA toolkit found"):
        plan_build(facts(CUDA_TORCH_NO_GPU, mode="cuda", cuda_home=None))


# --- the record: what was left out, why, and the command that builds it ----------------------


def test_a_complete_build_records_nothing_missing(installer):
    record = summarize(CPU_TORCH, "cpu", {}, installer)
    assert (record.built, record.missing, record.build_line()) == ("cpu", None, None)


def test_no_compiler_record_says_so_and_how_to_build(installer, tmp_path):
    record = summarize(facts(compiler_problem=NO_COMPILER), "none", {}, installer)
    assert record.missing == "cpu" and record.why == f"no usable C++ compiler: {NO_COMPILER}"
    assert record.fix == INSTALL_COMPILER
    command = f"COPYLORA_BUILD_EXT=cpu /venv/bin/python -m pip install --no-build-isolation {tmp_path}"
    assert record.rebuild_line() == f"{INSTALL_COMPILER}, then: {command}"
    line = record.build_line()
    assert line.startswith("copylora: installing without its C++ extension") and NO_COMPILER in line
    assert "\n" not in line


def test_failed_cuda_build_records_the_compiler_error(installer):
    record = summarize(CUDA_TORCH_NO_GPU, "cpu", {"cuda": CUSPARSE}, installer)
    assert (record.built, record.missing, record.fix) == ("cpu", "cuda", FIX_BUILD_ERROR)
    assert record.why == f"the CUDA build failed: {CUSPARSE}"
    assert "COPYLORA_BUILD_EXT=cuda " in record.rebuild_line()
    assert record.build_line().startswith("copylora: building copylora._C without CUDA kernels: the CUDA build failed")


def test_both_builds_failing_reports_the_cpu_error(installer):
    record = summarize(CUDA_TORCH_NO_GPU, "none", {"cuda": CUSPARSE, "cpu": "error: x.cpp broken"}, installer)
    assert record.why == "the C++ build failed: error: x.cpp broken" and record.missing == "cuda"


def test_missing_nvcc_record(installer):
    record = summarize(facts(CUDA_TORCH_NO_GPU, cuda_home=None), "cpu", {}, installer)
    assert record.why.startswith("no CUDA toolkit found")
    assert record.fix == "install the CUDA 13 toolkit (nvcc) or set CUDA_HOME to it"


def test_switches_are_the_reason_when_they_left_something_out(installer):
    assert summarize(facts(mode="none"), "none", {}, installer).why == "COPYLORA_BUILD_EXT=none"
    cpu_only = summarize(facts(CUDA_TORCH_NO_GPU, mode="cpu"), "cpu", {}, installer)
    assert (cpu_only.why, cpu_only.fix, cpu_only.missing) == ("COPYLORA_BUILD_EXT=cpu", None, "cuda")


def test_install_commands_per_platform(tmp_path):
    folder = tmp_path / "コピー 機"
    folder.mkdir()
    posix = Installer(python="/my venv/bin/python", source=str(folder), editable=True, windows=False)
    assert posix.command("cpu") == (
        f'COPYLORA_BUILD_EXT=cpu "/my venv/bin/python" -m pip install --no-build-isolation -e "{folder}"'
    )
    windows = Installer(python=r"C:\kohya_ss\venv\Scripts\python.exe", source=str(folder), editable=False, windows=True)
    assert windows.command("cuda") == (
        f"$env:COPYLORA_BUILD_EXT=\"cuda\"; & 'C:\\kohya_ss\\venv\\Scripts\\python.exe' -m pip install "
        f'--no-build-isolation "{folder}"'
    )
    # pip's temporary copy of an archive is gone after the install
    gone = dataclasses.replace(posix, source=str(tmp_path / "gone"))
    assert gone.command("cpu").endswith("-e <copylora source folder>")


def test_record_round_trips_and_bad_records_read_as_none(installer, tmp_path):
    record = summarize(facts(compiler_problem=NO_COMPILER), "none", {}, installer)
    record.save(tmp_path)
    assert BuildRecord.load(tmp_path) == record
    (tmp_path / RECORD_NAME).write_text("{not json")
    assert BuildRecord.load(tmp_path) is None
    assert BuildRecord.load(tmp_path / "missing") is None


def test_first_error_line_finds_the_compiler_error():
    ninja = "\n".join([
        "[1/3] /usr/local/cuda/bin/nvcc -O3 -Werror=foo -c merge_group_cuda.cu",
        "FAILED: merge_group_cuda.o",
        CUSPARSE,
        "compilation terminated.",
        "ninja: build stopped: subcommand failed.",
    ])
    assert first_error_line(ninja, "fallback") == CUSPARSE
    msvc = r"merge.cpp(3): fatal error C1083: Cannot open include file: 'cusparse.h'"
    assert first_error_line(f"cl /c merge.cpp\n{msvc}\n", "fallback") == msvc
    assert first_error_line("nothing useful\n", "RuntimeError: Error compiling objects") == "RuntimeError: Error compiling objects"


# --- what the user is told at run time ---------------------------------------------------------


def test_doctor_says_why_nothing_was_built_and_the_command(installer):
    record = summarize(facts(compiler_problem=NO_COMPILER), "none", {}, installer)
    status = ops.ExtensionStatus(available=False, error=f"not built: {record.why}")
    lines = doctor.extension_lines(status, record, elsewhere=None)
    assert lines == [
        f"copylora._C: not built: no usable C++ compiler: {NO_COMPILER}",
        f"  merges run on the pure-torch backend; to build it: {record.rebuild_line()}",
    ]


def test_doctor_says_which_kernels_are_missing(installer):
    record = summarize(CUDA_TORCH_NO_GPU, "cpu", {"cuda": CUSPARSE}, installer)
    status = ops.ExtensionStatus(available=True, cpu=True, path="/site/copylora/_C.abi3.so")
    assert doctor.extension_lines(status, record, elsewhere=None) == [
        "copylora._C: built, CPU kernels (/site/copylora/_C.abi3.so)",
        f"  no CUDA kernels: the CUDA build failed: {CUSPARSE}",
        f"  to build them: {FIX_BUILD_ERROR}, then: {installer.command('cuda')}",
    ]


def test_doctor_on_an_extension_that_no_longer_loads(installer):
    record = dataclasses.replace(summarize(CPU_TORCH, "cpu", {}, installer), torch_version="2.4.0")
    status = ops.ExtensionStatus(available=False, error="ImportError: undefined symbol: _ZN3c10")
    lines = doctor.extension_lines(status, record, elsewhere=None)
    assert lines[0] == "copylora._C: not loaded: ImportError: undefined symbol: _ZN3c10"
    assert lines[1] == f"  it was built against torch 2.4.0; this is torch {torch.__version__}"
    assert lines[2] == f"  rebuild it (CPU kernels) with: {installer.command('cpu')}"


def test_doctor_in_the_source_folder_of_a_non_editable_install_advises_no_rebuild(tmp_path):
    status = ops.ExtensionStatus(available=False, error="ImportError: cannot import name '_C'")
    lines = doctor.extension_lines(status, None, elsewhere=tmp_path / "site-packages" / "copylora")
    assert "source folder" in lines[0] and "nothing to rebuild" in lines[1]
    assert not any("pip install" in line for line in lines)


def test_installed_elsewhere_compares_the_installed_package_with_the_imported_one(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    (site / "copylora").mkdir(parents=True)
    (site / "copylora" / "__init__.py").write_text("")

    class Distribution:
        def locate_file(self, path: str) -> Path:
            return site / path

    monkeypatch.setattr(doctor.importlib.metadata, "distribution", lambda name: Distribution())
    assert doctor.installed_elsewhere(here=tmp_path / "clone" / "copylora") == site / "copylora"
    assert doctor.installed_elsewhere(here=site / "copylora") is None
    (site / "copylora" / "__init__.py").unlink()  # editable: site-packages has no copylora/ of its own
    assert doctor.installed_elsewhere(here=tmp_path / "clone" / "copylora") is None


def test_auto_warns_once_per_process_when_the_extension_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(ops, "load_status", lambda: ops.ExtensionStatus(available=False, error=f"not built: {NO_COMPILER}"))
    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="copylora"):
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
    warn_once.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        f"copylora._C extension unavailable (not built: {NO_COMPILER}); using the pure-torch backend"
    ]


def test_doctor_names_an_in_place_extension_imported_instead_of_the_installed_one(installer, tmp_path):
    """Run from a source folder where another venv built _C in place: doctor says whose copy loaded."""
    record = summarize(CPU_TORCH, "cpu", {}, installer)
    status = ops.ExtensionStatus(available=True, cpu=True, path=str(ops.PACKAGE_FOLDER / "_C.abi3.so"))
    site = tmp_path / "site-packages" / "copylora"
    lines = doctor.extension_lines(status, record, elsewhere=site)
    assert lines[0] == f"copylora._C: built, CPU kernels ({ops.PACKAGE_FOLDER / '_C.abi3.so'})"
    assert lines[1].startswith(f"  imported from the source folder {ops.PACKAGE_FOLDER} ")
    assert f"not from this Python's installed copylora ({site})" in lines[1]
    assert lines[1].endswith(f", built by {installer.python}, not this Python ({sys.executable})")
    assert doctor.extension_lines(status, record, elsewhere=None) == lines[:1]
