"""Builds copylora and its extension, copylora._C.

The C++ sources in csrc/ (and csrc/cpu/) are always built; the CUDA sources in csrc/cuda/ are
added when the installed torch has CUDA and nvcc is found (or COPYLORA_FORCE_CUDA=1).
Install with `pip install --no-build-isolation .` so the extension is built against the torch
that will import it.
"""

import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def want_cuda() -> bool:
    if os.environ.get("COPYLORA_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def openmp_flags() -> list[str]:
    """-fopenmp at compile time when torch's own ATen runs on OpenMP (Linux wheels).

    at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`: without
    the flag it silently runs on one thread. Nothing is added at link time: the GOMP symbols
    resolve to the OpenMP runtime libtorch_cpu already loads, so there is only one thread pool.
    """
    backend_is_openmp = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if backend_is_openmp and sys.platform.startswith("linux") else []


def extension():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    debug = os.environ.get("COPYLORA_DEBUG") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-std=c++20", "-DPy_LIMITED_API=0x03090000", *openmp_flags()]
    common = dict(
        name="copylora._C",
        include_dirs=[os.path.join(HERE, CSRC)],
        py_limited_api=True,
    )
    if want_cuda() and cuda_sources:
        return CUDAExtension(
            sources=cpp_sources + cuda_sources,
            # cuBLAS/cuSOLVER are reached through ATen (libtorch_cuda), so nothing else is linked.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
            **common,
        )
    return CppExtension(sources=cpp_sources, extra_compile_args={"cxx": cxx_flags}, **common)


setup(
    # the sd-scripts shim and the training presets ship inside the package, from their one
    # source each in sd_scripts_patch/ and configs/
    packages=["copylora", "copylora.engine", "copylora.kohya", "copylora.sd_scripts_patch", "copylora.configs"],
    package_dir={"copylora.sd_scripts_patch": "sd_scripts_patch", "copylora.configs": "configs"},
    package_data={"copylora.sd_scripts_patch": ["README.md"], "copylora.configs": ["*.toml"]},
    ext_modules=[extension()] if glob.glob(os.path.join(CSRC, "*.cpp")) else [],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
