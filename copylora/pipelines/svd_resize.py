"""The resize pipeline behind `copylora.resize`: one LoRA → engine (one input, no clamp) → stock's file.

A LoRA module is already factored, W = up · down (its alpha / rank kept aside as `scale`), so
resizing is the merge engine with one input: the exact SVD of W from the factors, then the
leading `rank` pairs. Output format follows kohya's networks/resize_lora.py:

- every tensor of the input is kept, cast to float32 and then to the save precision (keys that
  are not LoRA factors pass through);
- per module, up = U·S and down = Vᵀ under the input's own key names, and `alpha` a 0-dim tensor
  of the save dtype equal to scale × new rank, computed in float32 like stock, so the applied
  delta scale · up · down is kept;
- every 4-D module (1×1 convs included) takes --new_conv_rank; an all-zero module gets rank 1;
- the input's metadata, with ss_training_comment / ss_network_dim / ss_network_alpha rewritten as
  stock writes them and the sshs_* hashes recomputed.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from copylora.engine import MergedModule, ModuleJob, SvdOptions, merge_jobs
from copylora.errors import CopyloraError
from copylora.formats import families, kohya_metadata
from copylora.formats.lora_file import KEY_FORMATS, LoraFile, LoraModule, read_lora, write_lora
from copylora.pipelines.dynamic_rank import dynamic_rank, is_zero_spectrum, validate_dynamic
from copylora.pipelines.svd_merge import (
    DYNAMIC,
    PRECISIONS,
    PlannedModule,
    RankFlags,
    apply_ranks,
    validate_device,
    validate_output,
)
from copylora.pipelines.uniform_alpha import common_alpha, folded_up

logger = logging.getLogger("copylora")

NO_CLAMP = SvdOptions(clamp_quantile=1.0)  # stock's resize does not clamp


@dataclass
class ResizeRequest(RankFlags):
    """Everything `resize_lora.py`'s flags say, plus copylora's own options."""

    model: Path
    save_to: Path
    new_rank: int = 4
    new_conv_rank: int | None = None  # None: same as new_rank
    save_precision: str | None = None  # None: float
    device: str | None = None
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    backend: str = "auto"
    uniform_alpha: bool = False  # one alpha for all modules, each module's factor folded into up


@dataclass(frozen=True)
class ResizedModule:
    """What --verbose reports for one module (resize_lora's definitions)."""

    name: str
    rank: int
    alpha: float
    singular_values: torch.Tensor  # the delta's, descending (up @ down, alpha not applied)

    @property
    def sum_retained(self) -> float:
        return float(self.singular_values[: self.rank].sum() / self.singular_values.sum())

    @property
    def fro_retained(self) -> float:
        squares = self.singular_values.double().square()
        return float((squares[: self.rank].sum() / squares.sum()).sqrt())

    @property
    def max_ratio(self) -> float:
        """Largest kept value over the smallest kept one (inf when the rank exceeds the spectrum)."""
        s = self.singular_values
        return float(s[0] / s[self.rank - 1]) if self.rank <= s.shape[0] else float("inf")


@dataclass
class ResizeSummary:
    output: Path
    backend: str
    modules: list[ResizedModule]
    seconds_total: float = 0.0
    seconds_engine: float = 0.0
    ranks: Counter = field(default_factory=Counter)  # rank -> number of modules

    def line(self) -> str:
        ranks = ", ".join(f"rank {r}: {n}" for r, n in sorted(self.ranks.items()))
        return (
            f"resized {len(self.modules)} modules ({ranks}) with backend {self.backend} "
            f"in {self.seconds_total:.2f} s (engine {self.seconds_engine:.3f} s) -> {self.output}"
        )


def validate_request(request: ResizeRequest) -> None:
    """Check the arguments before any file is read."""
    if request.model is None:
        raise CopyloraError("--model: give the LoRA file to resize (.safetensors, .ckpt, .pt or .pth)")
    if request.new_rank < 1:
        raise CopyloraError(f"--new_rank: must be at least 1, got {request.new_rank}")
    if request.new_conv_rank is not None and request.new_conv_rank < 1:
        raise CopyloraError(f"--new_conv_rank: must be at least 1, got {request.new_conv_rank}")
    validate_dynamic(request.dynamic_method, request.dynamic_param)
    validate_output(request.save_to, [request.model])
    validate_device(request.device)


def single_input(module: LoraModule, up: torch.Tensor, down: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A resize job's one input: up (out, r) and down (r, in·kh·kw)."""
    return [up.reshape(up.shape[0], module.rank)], [down.reshape(module.rank, -1)]


def formed_input(module: LoraModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """single_input of an adapter's pair, formed now (the engine calls this a batch at a time)."""
    return single_input(module, *module.factors())


def plan_modules(lora: LoraFile, request: ResizeRequest) -> list[PlannedModule]:
    """One single-input job per module at its cap: --new_conv_rank for every 4-D module, like stock.

    The cap is also held to min(out, in·kh·kw), past which stock's own SVD has no columns.
    """
    planned = []
    for name, module in lora.modules.items():
        # stock casts to float32 first; every engine computes in float32, the same rounding
        ups, downs = single_input(module, module.up, module.down)  # shapes only, where formed later
        cap = request.conv_rank if module.is_conv else request.new_rank
        job = ModuleJob(
            name=name,
            ups=ups,
            downs=downs,
            scales=[1.0],  # stock decomposes up @ down and keeps the scale in alpha
            rank=min(cap, ups[0].shape[0], downs[0].shape[1]),
            load=None if module.expand is None else functools.partial(formed_input, module),
        )
        planned.append(PlannedModule(job=job, weight_shape=module.weight_shape))
    return planned


def rank_rule(request: ResizeRequest) -> Callable[[ModuleJob, MergedModule], int]:
    """Each module's final rank from its spectrum: dynamic, or the cap; rank 1 for an all-zero delta."""
    method, param = request.dynamic_method, request.dynamic_param

    def choose(job: ModuleJob, merged: MergedModule) -> int:
        if method is not None and param is not None:
            dense_size = min(job.out_features, job.in_features)
            return dynamic_rank(merged.singular_values, job.rank, dense_size, method, param)
        return 1 if is_zero_spectrum(merged.singular_values) else job.rank

    return choose


def stock_alpha(module: LoraModule, new_rank: int) -> float:
    """scale × new_rank in float32 as stock computes it (scale 1 when the file has no alpha)."""
    if module.alpha is None:
        return float(new_rank)
    scale = torch.tensor(module.alpha, dtype=torch.float32) / module.rank
    return float(scale * new_rank)


def resized_modules(lora: LoraFile, planned: list[PlannedModule], merged: dict[str, MergedModule]) -> list[ResizedModule]:
    return [
        ResizedModule(p.job.name, p.job.rank, stock_alpha(lora.modules[p.job.name], p.job.rank),
                      merged[p.job.name].singular_values)
        for p in planned
    ]


def output_tensors(
    lora: LoraFile, planned: list[PlannedModule], merged: dict[str, MergedModule], resized: list[ResizedModule],
    save_dtype: torch.dtype, shared_alpha: float | None,
) -> dict[str, torch.Tensor]:
    """The file's tensors; with shared_alpha, every alpha is that and each module's own
    alpha / shared_alpha is folded into its up (the same delta)."""
    # stock loads every tensor as float32 and saves every one in the save precision
    tensors = {key: value.to(torch.float32).to(save_dtype) for key, value in lora.other_tensors.items()}
    for plan, info in zip(planned, resized):
        module, result, rank = lora.modules[info.name], merged[info.name], info.rank
        up, down, alpha = result.up, result.down, info.alpha
        if shared_alpha is not None:
            up, alpha = folded_up(up, info.alpha, shared_alpha), shared_alpha
        if plan.is_conv:
            up = up.reshape(plan.weight_shape[0], rank, 1, 1)
            down = down.reshape(rank, *plan.weight_shape[1:])
        tensors[module.up_key] = up.to(save_dtype).contiguous()
        tensors[module.down_key] = down.to(save_dtype).contiguous()
        tensors[module.alpha_key] = torch.tensor(alpha, dtype=torch.float32).to(save_dtype)
    return tensors


def build_metadata(request: ResizeRequest, lora: LoraFile, written_alpha: float) -> dict[str, str]:
    """The input's metadata with resize_lora's rewritten keys and placeholders for fresh hashes
    of the data (write_lora fills them).

    written_alpha: the alpha written for the last module, which stock reports as the file's.
    """
    metadata = dict(lora.metadata)
    comment = metadata.get("ss_training_comment", "")
    old_dim = max(m.rank for m in lora.modules.values())
    if request.dynamic:
        metadata["ss_training_comment"] = (
            f"Dynamic resize with {request.dynamic_method}: {request.dynamic_param} from {old_dim}; {comment}"
        )
        metadata["ss_network_dim"] = DYNAMIC
        metadata["ss_network_alpha"] = DYNAMIC
    else:
        conv = "" if request.conv_rank == request.new_rank else f" (conv: {request.conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {request.new_rank}{conv}; {comment}"
        metadata["ss_network_dim"] = str(request.new_rank)
        metadata["ss_network_alpha"] = str(written_alpha)
    converted = kohya_metadata.converted_from([(lora.title, {m.adapter for m in lora.modules.values()}, lora.metadata)])
    if converted:  # a LoHa/LoKr file comes out a plain LoRA: say so, and drop the adapter's network settings
        family = families.Input(lora.path, lora.metadata, list(lora.modules)).family
        metadata.update(converted, ss_network_module=family.lora_module if family else "networks.lora")
        metadata.pop("ss_network_args", None)
        metadata["ss_training_comment"] = f"converted to LoRA by copylora; {metadata['ss_training_comment']}"
    metadata.update(kohya_metadata.HASH_PLACEHOLDERS)
    return metadata


def resize_file(request: ResizeRequest, on_progress: Callable[[int, int], None] | None = None) -> ResizeSummary:
    """Run the whole resize; raises CopyloraError for bad input, writes nothing unless it succeeds."""
    start = time.perf_counter()
    validate_request(request)
    logger.info("loading: %s", request.model)
    lora = read_lora(request.model, KEY_FORMATS)
    planned = plan_modules(lora, request)
    logger.info("new rank: %d, new conv rank: %d; resizing %d modules", request.new_rank, request.conv_rank, len(planned))
    device = request.device or "cpu"
    save_dtype = PRECISIONS[request.save_precision] if request.save_precision else torch.float32
    # Without a clamp a smaller rank is a prefix of the same factors, so they can come back in the
    # saved dtype; only folding a shared alpha into up needs them in float32 first.
    out_dtype = torch.float32 if request.uniform_alpha else save_dtype
    result = merge_jobs([p.job for p in planned], NO_CLAMP, backend=request.backend, device=device,
                        on_progress=on_progress, out_dtype=out_dtype)
    planned = apply_ranks(planned, result, rank_rule(request), NO_CLAMP, request.backend, device)

    resized = resized_modules(lora, planned, result.modules)
    shared_alpha = common_alpha([r.alpha for r in resized]) if request.uniform_alpha else None
    tensors = output_tensors(lora, planned, result.modules, resized, save_dtype, shared_alpha)
    result.modules.clear()  # the engine's batches: the file's tensors hold what they need of them
    metadata = build_metadata(request, lora, resized[-1].alpha if shared_alpha is None else shared_alpha)
    logger.info("saving model to: %s", request.save_to)
    write_lora(request.save_to, tensors, metadata, data_hashes=kohya_metadata.weight_hashes)
    return ResizeSummary(
        output=Path(request.save_to),
        backend=result.backend,
        modules=resized,
        seconds_total=time.perf_counter() - start,
        seconds_engine=result.seconds,
        ranks=Counter(r.rank for r in resized),
    )
