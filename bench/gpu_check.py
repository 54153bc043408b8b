"""The one prepared GPU check of copylora._C's CUDA kernel: build, tests, accuracy, sanitizers, timing.

Built to run in one call of under 8 minutes on a GPU machine with torch + CUDA, nvcc and
compute-sanitizer but no package index and no network. From the repository root:

    python bench/gpu_check.py                      # on the GPU (builds _C with CUDA first)
    python bench/gpu_check.py --device cpu --quick # dry run on the CPU kernel (what CI runs)
    python bench/gpu_check.py --sd-scripts DIR --stock-python PY   # also time stock --device cuda
    python bench/gpu_check.py --log DIR            # also keep every step's whole output in DIR

Steps (each a fresh process, so the freshly built extension is the one loaded):
1. build  — `setup.py build_ext --inplace` for this GPU's architecture with CUDA required
   (COPYLORA_BUILD_EXT=cuda: a failed CUDA build fails, never falls back; skipped on cpu);
2. tests  — tests/test_cuda.py and test_torch_backend_cuda.py (golden cases: the vendored tests/data);
3. accuracy — every module of kohya's SD1.5 (264) and SDXL (986) manifests, cancelling B − A
   pairs with all-zero modules among them, R = 16, 64, 256, fp16/bf16/fp32: the unclamped
   kept product against float64 within tests/backend_compare's bound (8 eps·‖P‖_F‖Q‖_F,
   widened by σ₁/gap at the truncation), and the clamp level against float64's;
4. sanitizers — compute-sanitizer memcheck and racecheck on a small merge (every kernel);
5. routes — the factored SVD's routes alone (copylora::factored_svd: Householder, Cholesky-QR twice,
   the Gram route, and what auto takes; the torch backend's two) on SDXL's and FLUX.1's module
   shapes at R = 16, 64, 256, 1024, each route's singular values checked against float64;
6. timing — ext vs the torch backend on the same device (SD1.5, SDXL, FLUX.1; R = 16 to 256), and
   stock svd_merge_lora.py when given.
One table is printed last; the exit code is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the in-place build and the tests package

from common import manifest_modules, manifest_pair  # noqa: E402

import copylora.runtime.openmp_wait  # noqa: E402,F401  (this process and its children: before torch)

SANITIZED = """
import torch
from copylora.engine import merge_jobs
from copylora.engine.jobs import ModuleJob, SvdOptions
gen = torch.Generator().manual_seed(0)
def job(name, out, inn, ranks, rank):
    return ModuleJob(name, [torch.randn(out, r, generator=gen).half() for r in ranks],
                     [torch.randn(r, inn, generator=gen).half() for r in ranks], [1.0, -1.0, 0.5][: len(ranks)], rank)
jobs = [job("a", 96, 200, (8, 8), 16), job("b", 96, 200, (8, 8), 4), job("odd", 64, 90, (33,), 8),
        job("dense", 12, 300, (8, 8), 16), job("three", 80, 120, (16, 16, 16), 32),
        job("gram", 160, 300, (32, 32), 16), job("zero", 96, 200, (8, 8), 16)]
jobs[-1].ups[0].zero_(); jobs[-1].ups[1].zero_()  # Cholesky fails: the Householder hand-over
merge_jobs(jobs, SvdOptions(), backend="ext", device="cuda")
torch.cuda.synchronize()
"""


# ---------------------------------------------------------------------------------------------
# Steps run in child processes: each prints one JSON object per table row on its last lines.


def cancelling_jobs(variant: str, input_rank: int, dtype, every: int, seed: int = 0) -> list:
    """B − A for every `every`-th manifest module: B = A + 3% change (‖P‖‖Q‖/‖W‖ ~ 50-100, like
    real pairs); every 25th module all-zero (real files have untrained modules)."""
    import torch

    from copylora.engine.jobs import ModuleJob

    gen = torch.Generator().manual_seed(seed)
    jobs = []
    for index, module in enumerate(manifest_modules(variant)[::every]):
        out, in_flat = module["up"][0], math.prod(module["down"][1:])
        up_a = torch.randn(out, input_rank, generator=gen) * 0.02
        down_a = torch.randn(input_rank, in_flat, generator=gen) / in_flat**0.5
        up_b = up_a + 0.03 * torch.randn(up_a.shape, generator=gen) * 0.02
        down_b = down_a + 0.03 * torch.randn(down_a.shape, generator=gen) / in_flat**0.5
        if index % 25 == 24:
            up_a, up_b = torch.zeros_like(up_a), torch.zeros_like(up_b)
        rank = min(2 * input_rank, out, module["down"][1])
        ups, downs = [up_b.to(dtype), up_a.to(dtype)], [down_b.to(dtype), down_a.to(dtype)]
        jobs.append(ModuleJob(module["name"], ups, downs, [1.0 / input_rank, -1.0 / input_rank], rank))
    return jobs


def accuracy_rows(device: str, quick: bool) -> list[dict]:
    import torch

    from copylora.engine import group_jobs, merge_jobs, reference
    from copylora.engine.jobs import SvdOptions
    from copylora.engine.quantile import linear_quantile
    from tests.backend_compare import ROUNDING

    eps = torch.finfo(torch.float32).eps
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if quick:
        configs = [("sd15", 8, "fp16"), ("sd15", 32, "bf16"), ("sdxl", 8, "fp32")]
        every = {"sd15": 16, "sdxl": 64}
    else:  # R = 256 > 169 also takes the cores-too-big-for-shared-memory path
        configs = [("sd15", r, d) for r in (8, 32, 128) for d in dtypes] + [("sdxl", 8, d) for d in dtypes]
        every = {"sd15": 1, "sdxl": 1}
    rows = []
    for variant, input_rank, dtype_name in configs:
        jobs = cancelling_jobs(variant, input_rank, dtypes[dtype_name], every[variant])
        start = time.perf_counter()
        plain = merge_jobs(jobs, SvdOptions(clamp_quantile=1.0), backend="ext", device=device).modules
        clamped = merge_jobs(jobs, SvdOptions(), backend="ext", device=device).modules
        seconds = time.perf_counter() - start
        worst_product = worst_level = 0.0  # in units of the allowed bound
        failures = []
        for group in group_jobs(jobs):
            factors = [reference.stacked_factors(job) for job in group]
            p = torch.stack([f[0] for f in factors]).to(device, torch.float64)
            q = torch.stack([f[1] for f in factors]).to(device, torch.float64)
            u, s, vh = reference.thin_svd(p, q)
            u, vh = reference.fix_signs(u, vh)
            scale = p.norm(dim=(1, 2)) * q.norm(dim=(1, 2))
            for b, job in enumerate(group):
                up, down = reference.lora_factors(u[b], s[b], vh[b], job.rank, sqrt_split=False)
                ours = plain[job.name]
                delta = ROUNDING * scale[b].item()
                kept = min(job.rank, s.shape[1])
                padded = torch.cat([s[b], s.new_zeros(1)])
                gap = (padded[kept - 1] - padded[kept]).item() if kept < s.shape[1] else math.inf
                allowed = delta * (1 + 2 * s[b, 0].item() / gap) if gap > 0 else math.inf
                ours_up, ours_down = ours.up.to(device, torch.float64), ours.down.to(device, torch.float64)
                error = (ours_up @ ours_down - up @ down).norm().item()
                ratio = 0.0 if allowed == math.inf else (error / allowed if allowed > 0 else (0.0 if error == 0 else math.inf))
                worst_product = max(worst_product, ratio)
                # clamp level: an order statistic moves no more than the largest change of a value
                joined = torch.cat([ours_up.flatten(), ours_down.flatten()])
                truth = torch.cat([up.flatten(), down.flatten()])
                level = linear_quantile(joined.float(), 0.99).item()
                truth_level = linear_quantile(truth, 0.99).item()
                moved = (joined - truth).abs().max().item() + 4 * eps * abs(truth_level)
                level_ratio = abs(level - truth_level) / moved if moved > 0 else 0.0
                worst_level = max(worst_level, level_ratio)
                clipped_up = ours.up.clamp(-level, level)
                if ratio > 1 or level_ratio > 1 or not torch.allclose(clamped[job.name].up, clipped_up, rtol=1e-6, atol=0):
                    failures.append(job.name)
        rows.append({
            "check": f"accuracy {variant} R={2 * input_rank} {dtype_name}",
            "ok": not failures,
            "detail": f"{len(jobs)} modules, {seconds:.2f} s; worst product error {worst_product:.2f} and clamp level "
                      f"{worst_level:.2f} of the bound (≤ 1 passes)"
                      + (f"; FAILED: {', '.join(failures[:5])}{' …' if len(failures) > 5 else ''}" if failures else ""),
        })
    return rows


ROUTE_NAMES = {0: "dense", 1: "Gram", 2: "CholQR2", 3: "Householder"}


def shape_batches(variant: str, prefix: str, total_rank: int, device: str, budget: int, cap: int,
                  seed: int = 0) -> list:
    """Stacked float32 P (B, out, R) and Q (B, R, in) of cancelling B − A pairs (B = A + 3 % change),
    one batch per distinct module shape of kohya's manifest where W is not dense (R < min(out, in):
    a dense W takes the same path whatever the method), as many modules as the manifest has of it (a
    real file's group), at most `cap`, within `budget` values per batch. Made on the device."""
    import torch

    counts: dict[tuple[int, int], int] = {}
    for module in manifest_modules(variant):
        shape = (module["up"][0], math.prod(module["down"][1:]))
        if module["name"].startswith(prefix) and total_rank < min(shape):
            counts[shape] = counts.get(shape, 0) + 1
    gen = torch.Generator(device=device).manual_seed(seed)
    half = total_rank // 2
    batches = []
    for (out, in_features), count in sorted(counts.items()):
        count = max(1, min(count, cap, budget // (total_rank * (out + in_features))))
        up_a = torch.randn(count, out, half, generator=gen, device=device) * 0.02
        down_a = torch.randn(count, half, in_features, generator=gen, device=device) / in_features**0.5
        up_b = up_a + 0.03 * 0.02 * torch.randn(up_a.shape, generator=gen, device=device)
        down_b = down_a + 0.03 / in_features**0.5 * torch.randn(down_a.shape, generator=gen, device=device)
        batches.append((torch.cat([up_b, -up_a], 2) / half, torch.cat([down_b, down_a], 1)))
    return batches


def route_rows(device: str, quick: bool) -> list[dict]:
    """Each route of the factored SVD alone, timed and checked against float64 (first two modules of
    each shape): its singular values within the engine tests' bound, 8 eps·‖P‖_F‖Q‖_F."""
    import torch

    from copylora.engine import reference
    from tests.backend_compare import ROUNDING

    def synced(run):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if device == "cuda":
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    def ext(method):
        return lambda p, q: torch.ops.copylora.factored_svd(p, q, 16, method)

    methods = {"Householder": ext("householder"), "CholQR2": ext("qr"), "Gram": ext("gram"), "auto": ext("auto"),
               "torch CholQR2": lambda p, q: reference.thin_svd(p, q, qr=reference.cholesky_qr2),
               "torch auto": lambda p, q: reference.batch_thin_svd(p, q, 16)}
    families = {"sdxl": ("sdxl", "")} if quick else {"sdxl": ("sdxl", ""), "flux1": ("flux1", "lora_unet")}
    ranks = (16, 64) if quick else (16, 64, 256, 1024)
    budget = 2**22 if quick else 2**28  # values of P and Q per batch (1 GiB of float32)
    rows = []
    for family, (variant, prefix) in families.items():
        for total_rank in ranks:
            # Cores over 169 go to float64 cuSOLVER one matrix at a time: fewer modules there
            cap = {256: 8, 1024: 2}.get(total_rank, 10**6)
            batches = shape_batches(variant, prefix, total_rank, device, budget, cap)
            truth = []
            for p, q in batches:
                s_ref = reference.thin_svd(p[:2].double(), q[:2].double())[1]
                truth.append((s_ref, ROUNDING * p[:2].double().norm(dim=(1, 2)) * q[:2].double().norm(dim=(1, 2))))
            seconds, worst, taken = {}, {}, {}
            for name, method in methods.items():
                for p, q in batches[:1]:
                    method(p, q)  # warm-up: handles, workspaces
                best, error = math.inf, 0.0
                for _ in range(1 if quick or total_rank > 256 else 2):
                    results, elapsed = synced(lambda run=method, inputs=batches: [run(p, q) for p, q in inputs])
                    best = min(best, elapsed)
                for result, (s_ref, bound) in zip(results, truth):
                    s = result[1][:2].double()
                    error = max(error, ((s - s_ref).norm(dim=1) / bound).max().item())
                    if name == "auto":
                        for route in result[3].tolist():
                            taken[ROUTE_NAMES[route]] = taken.get(ROUTE_NAMES[route], 0) + 1
                seconds[name], worst[name] = best, error
            modules = sum(p.shape[0] for p, _ in batches)
            bad = [name for name, error in worst.items() if not error <= 1.0]
            rows.append({
                "check": f"routes {family} R={total_rank} ({modules} modules, {len(batches)} factored shapes)",
                "ok": not bad,
                "detail": "; ".join(f"{name} {seconds[name]:.3f} s" for name in methods)
                          + f"; auto took {', '.join(f'{k} {v}' for k, v in sorted(taken.items()))}"
                          + f"; worst S error {max(worst.values()):.2f} of the bound"
                          + (f"; FAILED: {', '.join(bad)}" if bad else ""),
            })
            del batches, results
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def timing_rows(device: str, quick: bool) -> list[dict]:
    import torch

    from copylora.engine import merge_jobs
    from copylora.engine.jobs import SvdOptions

    cases = [("sd15", 8), ("sdxl", 8)] if quick else [
        ("sd15", 8), ("sdxl", 8), ("sd15", 32), ("sdxl", 32), ("flux1", 16), ("flux1", 32), ("sd15", 128)]
    rows = []
    for variant, input_rank in cases:
        jobs = cancelling_jobs(variant, input_rank, torch.float16, 16 if quick else 1)
        seconds = {}
        for backend in ("ext", "torch"):
            merge_jobs(jobs[:8], SvdOptions(), backend=backend, device=device)  # warm-up: kernels, handles
            best = math.inf
            for _ in range(1 if quick else 3):
                best = min(best, merge_jobs(jobs, SvdOptions(), backend=backend, device=device).seconds)
            seconds[backend] = best
        rows.append({
            "check": f"timing {variant} R={2 * input_rank} fp16 ({len(jobs)} modules)",
            "ok": True,
            "detail": f"ext {seconds['ext']:.3f} s, torch backend {seconds['torch']:.3f} s "
                      f"({seconds['torch'] / seconds['ext']:.1f}x) on {device}",
        })
    return rows


def child(step: str, device: str, quick: bool) -> None:
    import torch

    torch.manual_seed(0)
    rows = {"accuracy": accuracy_rows, "routes": route_rows, "timing": timing_rows}[step](device, quick)
    for row in rows:
        print(json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# The orchestration: steps as subprocesses, one table at the end.


LOG_FOLDER: Path | None = None  # --log: where each step's whole output is kept (one call on a GPU is all there is)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path = REPO,
        log_as: str = "step") -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        said = [part.decode(errors="replace") if isinstance(part, bytes) else part or "" for part in (exc.stdout, exc.stderr)]
        output, code = f"{''.join(said)}\ntimed out after {timeout:.0f} s", 124
    if LOG_FOLDER is not None:
        (LOG_FOLDER / f"{log_as}.log").write_text(f"$ {' '.join(map(str, cmd))}\nexit {code}\n{output}")
    return code, output, time.perf_counter() - start


def last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def build(args: argparse.Namespace) -> dict:
    if args.device == "cpu":
        return {"check": "build", "ok": True, "detail": "skipped on the CPU dry run (uses the installed copylora._C)"}
    import torch

    major, minor = torch.cuda.get_device_capability()
    env = {**os.environ, "COPYLORA_BUILD_EXT": "cuda", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
           "MAX_JOBS": str(os.cpu_count() or 4)}
    code, output, seconds = run([sys.executable, "setup.py", "build_ext", "--inplace"], 300, env, log_as="build")
    if code != 0:
        return {"check": "build", "ok": False, "detail": f"setup.py build_ext failed: {last_line(output)}"}
    probe = "from copylora.engine import ops; s = ops.load_status(); print(s.cuda, s.error)"
    code, output, _ = run([sys.executable, "-c", probe], 120, log_as="probe")
    ok = code == 0 and output.strip().startswith("True")
    return {"check": "build", "ok": ok, "detail": f"{seconds:.0f} s for sm_{major}{minor}; CUDA kernels: {last_line(output)}"}


CUDA_TESTS = ["tests/test_cuda.py", "tests/test_torch_backend_cuda.py"]  # the kernel; the torch backend on the GPU


def tests(args: argparse.Namespace) -> dict:
    env = {**os.environ, "COPYLORA_REQUIRE_EXT": "1"}
    code, output, seconds = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                                240, env, log_as="tests")
    return {"check": " ".join(CUDA_TESTS), "ok": code == 0, "detail": f"{last_line(output)} ({seconds:.0f} s)"}


def step_rows(step: str, args: argparse.Namespace, timeout: float) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", step, "--device", args.device] + (["--quick"] if args.quick else [])
    code, output, _ = run(cmd, timeout, log_as=step)
    rows = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    if code != 0:
        rows.append({"check": step, "ok": False, "detail": f"exit {code}: {last_line(output)}"})
    return rows


def sanitizers(args: argparse.Namespace) -> list[dict]:
    if args.device == "cpu":
        return [{"check": "compute-sanitizer", "ok": True, "detail": "skipped on the CPU dry run"}]
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return [{"check": "compute-sanitizer", "ok": False, "detail": "compute-sanitizer not found on PATH"}]
    rows = []
    for kind in ("memcheck", "racecheck"):
        code, output, seconds = run([tool, "--tool", kind, "--error-exitcode", "1", sys.executable, "-c", SANITIZED], 120,
                                    log_as=kind)
        summary = next((line for line in output.splitlines() if "ERROR SUMMARY" in line or "RACECHECK SUMMARY" in line),
                       last_line(output))
        rows.append({"check": f"compute-sanitizer {kind}", "ok": code == 0, "detail": f"{summary.strip()} ({seconds:.0f} s)"})
    return rows


def stock(args: argparse.Namespace) -> list[dict]:
    if not (args.sd_scripts and args.stock_python):
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        b, a = manifest_pair("sd15", Path(tmp) / "pair")
        common = ["--models", str(b), str(a), "--ratios", "1", "-1", "--new_rank", "16", "--device", args.device,
                  "--save_precision", "fp16"]
        for label, cmd, cwd in (
            ("stock svd_merge_lora.py", [args.stock_python, "networks/svd_merge_lora.py"], Path(args.sd_scripts)),
            ("copylora.merge --backend ext", [sys.executable, "-m", "copylora.merge", "--backend", "ext"], REPO),
            ("copylora.merge --backend torch", [sys.executable, "-m", "copylora.merge", "--backend", "torch"], REPO),
        ):
            out = str(Path(tmp) / f"{label.split()[0]}-{len(rows)}.safetensors")
            code, output, seconds = run([*cmd, *common, "--save_to", out], 400, cwd=cwd, log_as=f"whole-{len(rows)}")
            rows.append({"check": f"whole process SD1.5 (264) {label} --device {args.device}", "ok": code == 0,
                         "detail": f"{seconds:.2f} s" if code == 0 else f"exit {code}: {last_line(output)}"})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (a dry run on the CPU kernel)")
    parser.add_argument("--quick", action="store_true", help="a subset of modules and configurations")
    parser.add_argument("--sd-scripts", type=Path, help="an sd-scripts checkout, to time stock svd_merge_lora.py")
    parser.add_argument("--stock-python", help="the Python that runs sd-scripts")
    parser.add_argument("--log", type=Path, help="a folder to keep each step's whole output in")
    parser.add_argument("--child", choices=["accuracy", "routes", "timing"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.device, args.quick)
        return 0

    global LOG_FOLDER
    if args.log:
        LOG_FOLDER = args.log
        LOG_FOLDER.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict] = []

    def finished(new_rows: list[dict]) -> None:
        """Each row as its step ends: a call cut short still shows what ran."""
        for row in new_rows:
            print(f"{'ok' if row['ok'] else 'FAIL'}: {row['check']}: {row['detail']}", flush=True)
        rows.extend(new_rows)

    finished([build(args)])
    if rows[0]["ok"]:
        finished([tests(args)])
        finished(step_rows("accuracy", args, 240))
        finished(sanitizers(args))
        finished(step_rows("routes", args, 240))
        finished(step_rows("timing", args, 180))
        finished(stock(args))
    width = max(len(r["check"]) for r in rows)
    print(f"\ncopylora GPU check on {args.device}{' (quick)' if args.quick else ''}: {time.perf_counter() - started:.0f} s")
    print(f"| {'check':<{width}} | result | detail |")
    print(f"|{'-' * (width + 2)}|--------|--------|")
    for row in rows:
        print(f"| {row['check']:<{width}} | {'ok' if row['ok'] else 'FAIL':<6} | {row['detail']} |")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
