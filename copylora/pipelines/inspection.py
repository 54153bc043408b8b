"""`copylora.inspect`'s work: read a merged LoRA (and optionally its inputs) and measure it.

With the inputs, each module of the file is measured against the exact delta
W = Σ ratioᵢ·upᵢ@downᵢ·alphaᵢ/dimᵢ (copylora.pipelines.fidelity). The clamp and rounding losses need the
merge's float factors, which the file no longer has: they are recomputed at the file's ranks
with the clamp quantile and singular-value split read off the file itself (a clamped module
has about (1 − Q)·n entries tied at its largest value; a √S split has equal up-column and
down-row norms, stock's has unit down rows). The error column always compares the file as saved.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from copylora.engine import ModuleJob, SvdOptions, merge_jobs
from copylora.engine.reference import stacked_factors, thin_svd
from copylora.errors import CopyloraError
from copylora.formats.lora_file import LoraFile, LoraModule, read_lora
from copylora.formats.naming import block_group, parse_lbws
from copylora.pipelines.fidelity import ModuleFidelity, as_factors, block_order, measure_module
from copylora.pipelines.svd_merge import MergeRequest, plan_modules
from copylora.reports.spectrum_plot import Spectrum

# A module counts as clamped when at least this many entries share its largest value:
# unclamped factors essentially never tie at the maximum, clamped ones tie ~1 % of n.
MIN_CLAMP_TIES = 3
# Relative tolerance for "these norms are equal" when reading the split off the factors.
SPLIT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Settings:
    """How the file was merged, as far as the file shows it."""

    clamp_quantile: float
    sqrt_split: bool
    inferred: bool  # clamp_quantile read off the file rather than given


@dataclass
class Inspection:
    path: Path
    dtype: str  # "fp16", "bf16", "float" (other dtypes by torch name)
    modules: list[LoraModule]
    spectra: list[Spectrum]  # exact delta's with --against, else the file's own
    fidelity: list[ModuleFidelity] | None  # None without --against
    settings: Settings | None  # None without --against


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "float"}


def joined_values(module: LoraModule) -> torch.Tensor:
    up, down = module.factors()
    return torch.cat([up.reshape(-1), down.reshape(-1)]).float()


def clamped_entries(module: LoraModule, sqrt_split: bool) -> int:
    """How many entries sit at the clamp's upper bound (0 when too few tie to tell).

    Stock layout: they all equal the module's largest value. √S split: the clamp cut stock's
    U·S and Vᵀ and each pair was rescaled after, so they tie within each up column / down row.
    """
    stored_up, stored_down = module.factors()
    if not sqrt_split:
        up, down = stored_up.float().reshape(-1) * module.scale, stored_down.float().reshape(-1)
        top = torch.maximum(up.max(), down.max())
        # With one alpha shared by all modules, up was saved × rank/alpha: undone here, its clamped
        # entries equal down's only to within the saved dtype's rounding. Otherwise they tie exactly.
        near = top if module.scale == 1.0 else top * (1 - 2 * torch.finfo(stored_up.dtype).eps)
        ties = int((up >= near).sum() + (down >= near).sum()) if top > 0 else 0
        return ties if ties >= MIN_CLAMP_TIES else 0
    up, down = as_factors(stored_up, stored_down)
    ties = 0
    for line in (*up.T, *down):
        top = line.max()
        count = int((line == top).sum()) if top > 0 else 0
        ties += count if count >= 2 else 0  # one entry at a line's top is just its largest value
    return ties if ties >= MIN_CLAMP_TIES else 0


def infer_clamp_quantile(modules: list[LoraModule], sqrt_split: bool = False) -> float:
    """The quantile the factors were clamped at: 1 − (entries tied at the bound)/(n − 1), median
    over the clamped modules, to 3 decimals; 1 when most modules are not clamped."""
    estimates, nonzero = [], 0
    for module in modules:
        values = joined_values(module)
        if values.max() <= 0:
            continue
        nonzero += 1
        ties = clamped_entries(module, sqrt_split)
        if ties:
            estimates.append(1.0 - ties / (values.numel() - 1))
    if not estimates or len(estimates) * 2 < nonzero:
        return 1.0
    return round(statistics.median(estimates), 3)


def infer_sqrt_split(modules: list[LoraModule]) -> bool:
    """True when most modules look √S-split (up-column norm = down-row norm), not stock (unit down rows)."""
    votes = 0
    for module in modules:
        up, down = as_factors(*module.factors(), module.scale)  # a shared alpha's fold undone
        columns, rows = up.norm(dim=0), down.norm(dim=1)
        live = (columns > 0) & (rows > 0)
        if not live.any():
            continue
        columns, rows = columns[live], rows[live]
        equal = float(((columns - rows).abs() / (columns + rows)).median()) < SPLIT_TOLERANCE
        unit = float((rows - 1.0).abs().median()) < SPLIT_TOLERANCE
        votes += int(equal and not unit) - int(unit and not equal)
    return votes > 0


def _exact_jobs(
    out: LoraFile, against: list[Path], ratios: list[float] | None, lbws: list[str] | None
) -> list[ModuleJob]:
    """The output's modules as jobs over the inputs' factors, each at the rank the file has."""
    if ratios is None or len(ratios) != len(against):
        got = 0 if ratios is None else len(ratios)
        raise CopyloraError(f"--ratios: {got} values for {len(against)} --against models; give one ratio per model")
    if lbws and len(lbws) != len(against):
        raise CopyloraError(f"--lbws: {len(lbws)} vectors for {len(against)} --against models; give one per model")
    inputs = [read_lora(path) for path in against]
    # the rank plan_modules would choose is replaced by the file's, so new_rank is irrelevant here
    request = MergeRequest(models=list(against), ratios=list(ratios), save_to=out.path, lbws=lbws)
    planned = {p.job.name: p for p in plan_modules(inputs, list(ratios), parse_lbws(lbws) if lbws else None, request)}
    missing = [name for name in out.modules if name not in planned]
    if missing:
        raise CopyloraError(f"{out.path}: {len(missing)} modules are in none of the --against models (e.g. {missing[0]})")
    extra = [name for name in planned if name not in out.modules]
    if extra:
        raise CopyloraError(f"{out.path}: lacks {len(extra)} modules that the --against models have (e.g. {extra[0]})")
    jobs = []
    for name, module in out.modules.items():
        plan = planned[name]
        if module.weight_shape != plan.weight_shape:
            raise CopyloraError(
                f"{out.path}: module {name} has shape {module.weight_shape} but the --against models give "
                f"{plan.weight_shape} (not merged from these models?)"
            )
        jobs.append(dataclasses.replace(plan.job, rank=module.rank))
    return jobs


def inspect_lora(
    path: Path,
    against: list[Path] | None = None,
    ratios: list[float] | None = None,
    lbws: list[str] | None = None,
    clamp_quantile: float | None = None,
    backend: str = "auto",
) -> Inspection:
    """Measure `path`; with `against` (and one ratio per file) against the exact delta.

    clamp_quantile None: read it off the file.
    """
    if ratios and not against:
        raise CopyloraError("--ratios: give --against with the merged models too")
    if clamp_quantile is not None and not 0.0 < clamp_quantile <= 1.0:
        raise CopyloraError(f"--clamp_quantile: must be in (0, 1], got {clamp_quantile}")
    out = read_lora(path)
    modules = list(out.modules.values())
    first = modules[0].down.dtype
    dtype = DTYPE_NAMES.get(first, str(first).removeprefix("torch."))
    if not against:
        spectra = [Spectrum(m.name, thin_svd(*as_factors(*m.factors(), m.scale))[1], m.rank) for m in modules]
        return Inspection(path, dtype, modules, spectra, fidelity=None, settings=None)

    jobs = _exact_jobs(out, against, ratios, lbws)
    inferred = clamp_quantile is None
    sqrt_split = infer_sqrt_split(modules)
    settings = Settings(
        clamp_quantile=infer_clamp_quantile(modules, sqrt_split) if inferred else clamp_quantile,  # type: ignore[arg-type]
        sqrt_split=sqrt_split,
        inferred=inferred,
    )
    merged = merge_jobs(jobs, SvdOptions(settings.clamp_quantile, settings.sqrt_split), backend=backend).modules
    fidelity = []
    for job, module in zip(jobs, modules):
        result = merged[job.name]
        stored_up, stored_down = module.factors()
        # saved as the merge saves: a shared alpha's rank/alpha folded into up before the cast
        cast = ((result.up / module.scale).to(stored_up.dtype), result.down.to(stored_down.dtype))
        fidelity.append(
            measure_module(
                job.name,
                stacked_factors(job.loaded()),
                job.rank,
                as_factors(result.up, result.down),  # the merge's factors carry the delta at alpha = rank
                as_factors(*cast, module.scale),
                as_factors(stored_up, stored_down, module.scale),
            )
        )
    spectra = [Spectrum(f.name, f.singular_values, f.rank) for f in fidelity]
    return Inspection(path, dtype, modules, spectra, fidelity=fidelity, settings=settings)


def rank_rows(inspection: Inspection) -> tuple[tuple[str, ...], list[tuple[str, ...]], tuple[str, ...]]:
    """Header, per-block rows and total for a file inspected without its inputs: ranks and ‖ΔW‖."""
    blocks: dict[str, list[Spectrum]] = {}
    for spectrum in inspection.spectra:
        blocks.setdefault(block_group(spectrum.name), []).append(spectrum)

    def row(label: str, members: list[Spectrum]) -> tuple[str, ...]:
        low, high = min(s.rank for s in members), max(s.rank for s in members)
        norm = float(sum(float(s.singular_values.double().square().sum()) for s in members)) ** 0.5
        return (label, str(len(members)), str(low) if low == high else f"{low}-{high}", f"{norm:.4g}")

    header = ("block", "modules", "rank", "|delta|_F")
    rows = [row(label, blocks[label]) for label in sorted(blocks, key=block_order)]
    return header, rows, row("total", inspection.spectra)
