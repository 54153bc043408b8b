"""The merge pipeline behind `copylora.merge`: load → plan per-module jobs → engine → save like stock.

Output format follows kohya's networks/svd_merge_lora.py: per module `lora_up.weight`,
`lora_down.weight` (conv modules 4-D), a 0-dim int64 `alpha` equal to the module's rank, the
minimal `ss_*` metadata, the `sshs_*` hashes and, unless disabled, `modelspec.*`. Dynamic ranks
(no stock file to match) write one alpha for all modules by default (copylora.pipelines.uniform_alpha).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from copylora.engine import EngineResult, MergedModule, ModuleJob, SvdOptions, merge_jobs
from copylora.engine.reference import stacked_factors
from copylora.errors import CopyloraError
from copylora.formats import families, kohya_metadata
from copylora.formats.atomic_file import check_writable
from copylora.formats.lora_file import (
    KEY_FORMATS,
    KOHYA_KEYS,
    LORA_FILE_TYPES,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    KeyFormat,
    LoraFile,
    LoraModule,
    read_lora,
    write_lora,
)
from copylora.formats.naming import BlockWeights, parse_lbws
from copylora.pipelines.conditioning import orthonormal_down
from copylora.pipelines.dynamic_rank import dynamic_rank, validate_dynamic
from copylora.pipelines.fidelity import ModuleFidelity, Summary, as_factors, measure_module, totals_line
from copylora.pipelines.uniform_alpha import common_alpha, folded_up

logger = logging.getLogger("copylora")

PRECISIONS: dict[str, torch.dtype] = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DYNAMIC = "Dynamic"  # what resize_lora writes as ss_network_dim/alpha when ranks vary per module


class RankFlags:
    """What --new_rank, --new_conv_rank and --dynamic_method mean together (merge and resize)."""

    new_rank: int
    new_conv_rank: int | None
    dynamic_method: str | None

    @property
    def dynamic(self) -> bool:
        return self.dynamic_method is not None

    @property
    def conv_rank(self) -> int:
        return self.new_rank if self.new_conv_rank is None else self.new_conv_rank


@dataclass
class MergeRequest(RankFlags):
    """Everything `svd_merge_lora.py`'s flags say, plus copylora's own options."""

    models: list[Path]
    ratios: list[float]
    save_to: Path
    new_rank: int = 4
    new_conv_rank: int | None = None  # None: same as new_rank
    lbws: list[str] | None = None
    precision: str = "float"
    save_precision: str | None = None  # None: same as precision
    device: str | None = None
    no_metadata: bool = False
    backend: str = "auto"
    clamp_quantile: float = 0.99
    sqrt_split: bool = False  # √S on up and down instead of S on up
    dynamic_method: str | None = None  # resize_lora's sv_ratio / sv_fro / sv_cumulative
    dynamic_param: float | None = None
    per_module_alpha: bool = False  # dynamic ranks: alpha = rank per module (resize_lora's way), not one alpha
    report: bool = False  # measure the result against the exact delta


@dataclass
class MergeSummary:
    output: Path
    backend: str
    modules: int
    ranks: Counter = field(default_factory=Counter)  # rank -> number of modules
    seconds_total: float = 0.0
    seconds_engine: float = 0.0
    fidelity: str | None = None  # fidelity.totals_line(), with --report

    def line(self) -> str:
        ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(self.ranks.items()))
        line = (
            f"merged {self.modules} modules ({ranks}) with backend {self.backend} "
            f"in {self.seconds_total:.2f} s (engine {self.seconds_engine:.3f} s) -> {self.output}"
        )
        return f"{line}; {self.fidelity}" if self.fidelity else line


@dataclass(frozen=True)
class PlannedModule:
    """Where one output module comes from and how it must be shaped."""

    job: ModuleJob
    weight_shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw)
    key_format: KeyFormat = KOHYA_KEYS  # the first input's names for the pair (PEFT's stay PEFT's)
    key_suffix: str = ".weight"

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def up_key(self) -> str:
        return self.key_format.up_key(self.job.name, self.key_suffix)

    @property
    def down_key(self) -> str:
        return self.key_format.down_key(self.job.name, self.key_suffix)


def validate_request(request: MergeRequest) -> None:
    """Check the arguments before any file is read."""
    if not request.models:
        raise CopyloraError("--models: give at least one LoRA file")
    if request.ratios is None or len(request.ratios) != len(request.models):
        got = 0 if request.ratios is None else len(request.ratios)
        raise CopyloraError(f"--ratios: {got} values for {len(request.models)} models; give one ratio per model")
    if request.lbws and len(request.lbws) != len(request.models):
        raise CopyloraError(f"--lbws: {len(request.lbws)} vectors for {len(request.models)} models; give one per model")
    if request.new_rank < 1:
        raise CopyloraError(f"--new_rank: must be at least 1, got {request.new_rank}")
    if request.new_conv_rank is not None and request.new_conv_rank < 1:
        raise CopyloraError(f"--new_conv_rank: must be at least 1, got {request.new_conv_rank}")
    if not 0.0 < request.clamp_quantile <= 1.0:
        raise CopyloraError(f"--clamp_quantile: must be in (0, 1], got {request.clamp_quantile}")
    validate_dynamic(request.dynamic_method, request.dynamic_param)
    validate_output(request.save_to, request.models)
    validate_device(request.device)


def validate_output(save_to: Path | None, inputs: list[Path]) -> None:
    """--save_to: a LoRA file name in an existing folder that is none of the inputs."""
    if save_to is None:
        raise CopyloraError(f"--save_to: give the output file ({LORA_FILE_TYPES})")
    save_to = Path(save_to)
    if save_to.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise CopyloraError(f"{save_to}: unsupported output type {save_to.suffix!r} (use {LORA_FILE_TYPES})")
    folder = save_to.parent
    if not folder.is_dir():
        raise CopyloraError(f"{save_to}: folder {folder} does not exist")
    if save_to.is_dir():
        raise CopyloraError(f"{save_to}: is a folder, not a file name")
    for model in inputs:
        if Path(model).exists() and save_to.exists() and save_to.resolve() == Path(model).resolve():
            raise CopyloraError(f"{save_to}: --save_to is one of the input models; refusing to overwrite it")
    check_writable(save_to)  # before the work, not after it: a read-only folder, a full quota, /proc


def validate_device(device: str | None) -> None:
    """--device, before any file is read: cpu, or a CUDA device this torch can see."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CopyloraError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise CopyloraError(f"--device {device}: copylora computes on cpu or cuda (cuda:N)")
    if not torch.backends.cuda.is_built():
        raise CopyloraError(
            f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; use --device cpu "
            "(or install a CUDA build of torch)"
        )
    visible = torch.cuda.device_count()
    if visible == 0:
        raise CopyloraError(
            f"--device {device}: torch {torch.__version__} has CUDA but sees no GPU (no driver, or "
            "CUDA_VISIBLE_DEVICES hides them); use --device cpu"
        )
    if parsed.index is not None and parsed.index >= visible:
        raise CopyloraError(f"--device {device}: torch sees {visible} GPU(s), cuda:0 to cuda:{visible - 1}")


def at_merge_precision(factor: torch.Tensor, merge_dtype: torch.dtype) -> torch.Tensor:
    """The factor rounded as stock rounds it to --precision. Every engine computes in float32, so
    for float32 the engine's own cast is the same rounding, without a float32 copy of every input."""
    return factor if merge_dtype == torch.float32 else factor.to(merge_dtype)


def merge_inputs(
    modules: list[LoraModule], pairs: list[tuple[torch.Tensor, torch.Tensor]], merge_dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A merge job's inputs from each module's (up, down): up (out, r) and down (r, in·kh·kw) at --precision."""
    ups = [at_merge_precision(up.reshape(up.shape[0], m.rank), merge_dtype) for m, (up, _) in zip(modules, pairs)]
    downs = [at_merge_precision(down.reshape(m.rank, -1), merge_dtype) for m, (_, down) in zip(modules, pairs)]
    return ups, downs


def formed_inputs(modules: list[LoraModule], merge_dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """merge_inputs with every adapter's pair formed (the engine calls this a batch at a time)."""
    return merge_inputs(modules, [m.factors() for m in modules], merge_dtype)


def plan_modules(
    files: list[LoraFile], ratios: list[float], lbws: list[BlockWeights] | None, request: MergeRequest
) -> list[PlannedModule]:
    """One job per module name, in order of first appearance; inputs without the module are skipped."""
    merge_dtype = PRECISIONS[request.precision]
    sources: dict[str, list[tuple[LoraFile, LoraModule, float]]] = {}
    for index, (lora, ratio) in enumerate(zip(files, ratios)):
        for name, module in lora.modules.items():
            scale = ratio * module.scale * (lbws[index].for_module(name) if lbws else 1.0)
            sources.setdefault(name, []).append((lora, module, scale))

    planned = []
    for name, entries in sources.items():
        first_file, first, _ = entries[0]
        for other_file, other, _ in entries[1:]:
            if other.weight_shape != first.weight_shape:
                raise CopyloraError(
                    f"{other_file.path}: module {name} has shape {other.weight_shape} but "
                    f"{first_file.path} has {first.weight_shape} (LoRAs for different base models?)"
                )
        out_features, in_channels = first.weight_shape[0], first.weight_shape[1]
        conv3x3 = first.is_conv and first.kernel_size != (1, 1)
        # kohya caps the rank by the channel counts (not in·kh·kw) — keep its shapes
        rank = min(request.conv_rank if conv3x3 else request.new_rank, in_channels, out_features)
        modules = [m for _, m, _ in entries]
        ups, downs = merge_inputs(modules, [(m.up, m.down) for m in modules], merge_dtype)  # shapes, where formed later
        job = ModuleJob(
            name=name,
            ups=ups,
            downs=downs,
            scales=[s for _, _, s in entries],
            rank=rank,
            load=None if all(m.expand is None for m in modules) else functools.partial(formed_inputs, modules, merge_dtype),
        )
        planned.append(PlannedModule(job=job, weight_shape=first.weight_shape, key_format=first.key_format,
                                     key_suffix=first.key_suffix))
    return planned


def shared_alpha(planned: list[PlannedModule], request: MergeRequest) -> int | None:
    """The one alpha of a dynamic-rank merge (the commonest rank), or None: alpha = rank per module."""
    if not request.dynamic or request.per_module_alpha:
        return None
    return int(common_alpha([p.job.rank for p in planned]))


def rounds_once(merge_dtype: torch.dtype, save_dtype: torch.dtype) -> bool:
    """Whether stock's float32 → merge dtype → save dtype casts of a result round it only once."""
    return merge_dtype in (torch.float32, save_dtype)


def engine_output_dtype(request: MergeRequest, merge_dtype: torch.dtype, save_dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine hands the merged factors back in: the saved dtype where they go to the
    file as they are and stock's casts round only once; else float32, for the steps that still
    work on them (dynamic ranks, shared alpha, --report)."""
    if request.dynamic or request.report or not rounds_once(merge_dtype, save_dtype):
        return torch.float32
    return save_dtype


def as_saved(factor: torch.Tensor, merge_dtype: torch.dtype, save_dtype: torch.dtype) -> torch.Tensor:
    """stock's rounding of a float32 result: to the merge dtype, then to the save dtype. A factor
    the engine already returned in the save dtype (engine_output_dtype) was rounded that way."""
    if factor.dtype == save_dtype and rounds_once(merge_dtype, save_dtype):
        return factor
    return factor.to(merge_dtype).to(save_dtype)


def output_tensors(
    planned: list[PlannedModule], merged: dict[str, MergedModule], merge_dtype: torch.dtype, save_dtype: torch.dtype,
    alpha: int | None = None,
) -> dict[str, torch.Tensor]:
    """The file's tensors: alpha = rank per module, or with `alpha` that for all and rank / alpha
    folded into each up (kohya applies alpha / rank · up @ down, so every delta stays the same)."""
    tensors: dict[str, torch.Tensor] = {}
    for plan in planned:
        name, rank, result = plan.job.name, plan.job.rank, merged[plan.job.name]
        up, down = result.up, result.down
        if alpha is not None:
            up = folded_up(up, rank, alpha)  # this module's own alpha is its rank
        if plan.is_conv:
            up = up.reshape(plan.weight_shape[0], rank, 1, 1)
            down = down.reshape(rank, *plan.weight_shape[1:])
        tensors[plan.up_key] = as_saved(up, merge_dtype, save_dtype).contiguous()
        tensors[plan.down_key] = as_saved(down, merge_dtype, save_dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(rank if alpha is None else alpha)
    return tensors


def build_metadata(
    request: MergeRequest, files: list[LoraFile], family: families.Family | None = None
) -> dict[str, str]:
    """The file's metadata, with placeholders for the sshs_* hashes of its data (write_lora fills them)."""
    base = kohya_metadata.BaseModelInfo.from_metadata([f.metadata for f in files])
    conv_rank = request.conv_rank
    if request.dynamic:
        # resize_lora's convention for per-module ranks; its comment says how they were chosen
        metadata = kohya_metadata.network_metadata(
            base, DYNAMIC, DYNAMIC, {"conv_dim": DYNAMIC, "conv_alpha": DYNAMIC}
        )
        metadata["ss_training_comment"] = (
            f"Dynamic rank with {request.dynamic_method}: {request.dynamic_param}, "
            f"max rank {request.new_rank} (conv: {conv_rank})"
        )
    else:
        metadata = kohya_metadata.network_metadata(
            base, str(request.new_rank), str(request.new_rank), {"conv_dim": conv_rank, "conv_alpha": conv_rank}
        )
    adapters = [(f.title, {m.adapter for m in f.modules.values()}, f.metadata) for f in files]
    metadata.update(kohya_metadata.converted_from(adapters))
    metadata.update(kohya_metadata.HASH_PLACEHOLDERS)
    if not request.no_metadata:
        if base.is_v2:
            logger.warning("a LoRA does not say whether it is v-prediction; saving modelspec as v-prediction, like stock")
        metadata.update(
            kohya_metadata.modelspec_metadata(base, title=Path(request.save_to).stem, merged_from=[f.title for f in files])
        )
    families.relabel(metadata, family, [f.metadata for f in files])
    return metadata


def apply_dynamic_ranks(
    planned: list[PlannedModule], result: EngineResult, request: MergeRequest, options: SvdOptions
) -> list[PlannedModule]:
    """Give each module the rank --dynamic_method picks from its spectrum."""
    assert request.dynamic_method is not None and request.dynamic_param is not None
    method, param = request.dynamic_method, request.dynamic_param

    def choose(job: ModuleJob, merged: MergedModule) -> int:
        dense_size = min(job.out_features, job.in_features)
        return dynamic_rank(merged.singular_values, job.rank, dense_size, method, param)

    return apply_ranks(planned, result, choose, options, request.backend, request.device or "cpu")


def apply_ranks(
    planned: list[PlannedModule],
    result: EngineResult,
    choose: Callable[[ModuleJob, MergedModule], int],
    options: SvdOptions,
    backend: str,
    device: str,
) -> list[PlannedModule]:
    """Give each module the rank choose(job, merged) picks (the first pass ran at the cap, so
    every singular value is known) and make result.modules hold that rank.

    Without clamp the leading columns of the first pass are the answer; the clamp depends on
    the kept values, so clamped modules whose rank changed are merged again.
    """
    chosen: list[PlannedModule] = []
    changed: list[ModuleJob] = []
    for plan in planned:
        job, merged = plan.job, result.modules[plan.job.name]
        rank = choose(job, merged)
        if rank != job.rank:
            job = dataclasses.replace(job, rank=rank)
            changed.append(job)
            result.modules[job.name] = MergedModule(merged.up[:, :rank], merged.down[:rank], merged.singular_values)
        chosen.append(dataclasses.replace(plan, job=job))
    if options.clamps and changed:
        again = merge_jobs(changed, options, backend=backend, device=device)
        result.modules.update(again.modules)
        result.seconds += again.seconds
    return chosen


def measure_merge(
    planned: list[PlannedModule], merged: dict[str, MergedModule], tensors: dict[str, torch.Tensor]
) -> list[ModuleFidelity]:
    """--report: each saved module against the exact delta of its inputs."""
    measured = []
    for plan in planned:
        name, result = plan.job.name, merged[plan.job.name]
        scale = float(tensors[f"{name}.alpha"]) / plan.job.rank  # 1 unless one alpha is shared
        saved = as_factors(tensors[plan.up_key], tensors[plan.down_key], scale)
        measured.append(
            measure_module(name, stacked_factors(plan.job.loaded()), plan.job.rank, as_factors(result.up, result.down),
                           saved, saved)
        )
    return measured


def merge_files(request: MergeRequest, on_progress: Callable[[int, int], None] | None = None) -> MergeSummary:
    """Run the whole merge; raises CopyloraError for bad input, writes nothing unless it succeeds.

    on_progress(done, total) is called as groups of modules finish.
    """
    start = time.perf_counter()
    validate_request(request)
    lbws = parse_lbws(request.lbws) if request.lbws else None
    files = []
    for model in request.models:
        logger.info("loading: %s", model)
        lora = read_lora(model, KEY_FORMATS)  # PEFT's lora_A/lora_B too (ai-toolkit, diffusers)
        if lora.ignored_keys:
            logger.warning("%s: ignoring %d non-LoRA tensors (e.g. %s)", model, len(lora.ignored_keys), lora.ignored_keys[0])
        files.append(lora)

    inputs = [families.Input(f.path, f.metadata, list(f.modules)) for f in files]
    family = families.one_family(inputs)
    if lbws and family is not None and not family.has_lbw:
        which = next(i.path for i in inputs if i.family is family)
        raise CopyloraError(
            f"--lbws: layer block weights are defined for SD U-Nets only (kohya's LBW); {which} is a {family.name} LoRA"
        )
    planned = plan_modules(files, request.ratios, lbws, request)
    logger.info("new rank: %d, new conv rank: %d; merging %d modules", request.new_rank, request.conv_rank, len(planned))
    options = SvdOptions(clamp_quantile=request.clamp_quantile, sqrt_split=request.sqrt_split)
    # exact mode promises the delta to float32 precision, which cancelling inputs need conditioning for
    engine_jobs = [p.job if options.clamps else orthonormal_down(p.job) for p in planned]
    merge_dtype = PRECISIONS[request.precision]
    save_dtype = PRECISIONS[request.save_precision] if request.save_precision else merge_dtype
    result = merge_jobs(
        engine_jobs,
        options,
        backend=request.backend,
        device=request.device or "cpu",
        on_progress=on_progress,
        out_dtype=engine_output_dtype(request, merge_dtype, save_dtype),
    )
    if request.dynamic:
        planned = apply_dynamic_ranks(planned, result, request, options)

    tensors = output_tensors(planned, result.modules, merge_dtype, save_dtype, shared_alpha(planned, request))
    fidelity = None
    if request.report:
        total = Summary("total", measure_merge(planned, result.modules, tensors))
        fidelity = totals_line(total, request.save_precision or request.precision)
    result.modules.clear()  # the engine's batches: the file's tensors hold what they need of them
    logger.info("calculating hashes and creating metadata...")
    metadata = build_metadata(request, files, family)
    logger.info("saving model to: %s", request.save_to)
    write_lora(request.save_to, tensors, metadata, data_hashes=kohya_metadata.weight_hashes)
    return MergeSummary(
        output=Path(request.save_to),
        backend=result.backend,
        modules=len(planned),
        ranks=Counter(p.job.rank for p in planned),
        seconds_total=time.perf_counter() - start,
        seconds_engine=result.seconds,
        fidelity=fidelity,
    )
