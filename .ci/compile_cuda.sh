#!/usr/bin/env bash
# Compile-only check of every csrc/cuda/*.cu with nvcc, so the CUDA kernels cannot rot on
# machines (like CI) that have no GPU and a CPU-only torch. torch's CPU wheel lacks its CUDA
# headers, so the include trees of a CUDA torch wheel and of the cuBLAS/cuSOLVER/cuSPARSE wheels
# are unpacked once under build/cuda-headers/ (only include/ is extracted: about a second).
# Exits non-zero on any compile error. Needs nvcc (NVCC or PATH) and pip with index access on
# first use.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/build/cuda-headers"
OUT="$ROOT/build/cuda-compile-check"
NVCC="${NVCC:-$(command -v nvcc || true)}"
ARCH="${CUDA_ARCH:-sm_90}"
PYTHON="${PYTHON:-python}"
# Header sources: a CUDA build of torch and the CUDA 13 math libraries torch includes.
WHEELS=(torch==2.14.1 nvidia-cublas==13.1.1.3 nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3)

if [[ -z "$NVCC" ]]; then
  echo "compile_cuda.sh: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 1
fi

stamp="$CACHE/.unpacked-$(echo "${WHEELS[*]}" | tr ' =' '_-')"
if [[ ! -f "$stamp" ]]; then
  rm -rf "$CACHE"
  mkdir -p "$CACHE/wheels"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "${WHEELS[@]}" -d "$CACHE/wheels"
  # Only the include/ trees are extracted (zipfile, so no unzip binary is needed).
  "$PYTHON" - "$CACHE" "$CACHE"/wheels/*.whl <<'PY'
import re, sys, zipfile
cache, wheels = sys.argv[1], sys.argv[2:]
wanted = re.compile(r"^(torch/include/|nvidia/[^/]+/include/)")
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(cache, [name for name in archive.namelist() if wanted.match(name)])
PY
  rm -rf "$CACHE/wheels"
  touch "$stamp"
fi

includes=(
  -I"$ROOT/csrc"
  -I"$CACHE/torch/include"
  -I"$CACHE/torch/include/torch/csrc/api/include"
  -I"$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
)
for dir in "$CACHE"/nvidia/*/include; do
  includes+=(-I"$dir")
done

mkdir -p "$OUT"
status=0
shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda.sh: no csrc/cuda/*.cu to compile" >&2
  exit 1
fi
for source in "${sources[@]}"; do
  object="$OUT/$(basename "${source%.cu}").o"
  echo "nvcc -arch=$ARCH: ${source#"$ROOT"/}"
  # The flags torch's BuildExtension passes to nvcc, so this compiles what setup.py would.
  if ! "$NVCC" -std=c++20 -arch="$ARCH" -O3 -c "$source" -o "$object" "${includes[@]}" \
      -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options '-fPIC' \
      -Werror all-warnings; then
    echo "compile_cuda.sh: FAILED to compile ${source#"$ROOT"/}" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "compile_cuda.sh: all CUDA sources compile"
exit $status
