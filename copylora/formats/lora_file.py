"""Reading, validating and atomically writing kohya-format LoRA files.

A kohya LoRA stores, per module `NAME`, `NAME.lora_down.weight` (r, in[, kh, kw]),
`NAME.lora_up.weight` (out, r[, 1, 1]) and optionally a 0-dim `NAME.alpha` (absent means
alpha = r). resize_lora.py also reads PEFT's `lora_A`/`lora_B` and ControlLoRA's `down`/`up`
names for the same pair; `read_lora(path, KEY_FORMATS)` does too. LoHa, LoKr and LyCORIS' Tucker
LoCon modules are read as the exact pair of their delta (copylora.formats.adapters). Everything
that can be wrong with a user's file is reported as one CopyloraError that names the file (and
module).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from copylora.errors import CopyloraError
from copylora.formats import naming
from copylora.formats.adapters import AdapterProblem, FactorPair
from copylora.formats.adapters.lora import tucker_factor_pair
from copylora.formats.adapters.modules import AdapterModule, adapter_modules, refused_kind
from copylora.formats.atomic_file import atomic_write  # also imported from here by other writers
from copylora.formats.safetensors_format import SAFETENSORS_DTYPES
from copylora.formats.safetensors_reader import read_safetensors

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")
LORA_FILE_TYPES = ".safetensors, .ckpt, .pt or .pth"  # for messages and help: every suffix above

ALPHA_SUFFIX = ".alpha"


@dataclass(frozen=True)
class KeyFormat:
    """How a file names one module's pair: NAME.<down>[.weight] and NAME.<up>[.weight]."""

    down: str
    up: str
    strict: bool = True  # a down without its up is an error (False: generic words, pass through)

    def down_key(self, name: str, suffix: str) -> str:
        """The key of module `name`'s down factor; suffix is what follows the word: ".weight" or ""."""
        return f"{name}.{self.down}{suffix}"

    def up_key(self, name: str, suffix: str) -> str:
        return f"{name}.{self.up}{suffix}"


KOHYA_KEYS = KeyFormat("lora_down", "lora_up")
PEFT_KEYS = KeyFormat("lora_A", "lora_B")
CONTROL_LORA_KEYS = KeyFormat("down", "up", strict=False)
KEY_FORMATS = (KOHYA_KEYS, PEFT_KEYS, CONTROL_LORA_KEYS)  # resize_lora's, in its order


@dataclass(frozen=True)
class LoraModule:
    """One module's factors as stored in the file (original dtype and shape); for an adapter kind
    (LoHa, LoKr, Tucker LoCon) the exact float32 pair of its delta. A LoHa's or LoKr's pair is r² or
    m·r wide, many times its stored tensors, so it is not kept: up and down are then shape-only
    (meta) tensors and `expand` forms the pair. `factors()` gives the values either way."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None: the file has no alpha, so alpha = rank
    key_format: KeyFormat = KOHYA_KEYS
    key_suffix: str = ".weight"  # what follows <down>/<up> in the key: ".weight" or ""
    adapter: str = "LoRA"  # what the file stores: LoRA (a pair), or the kind turned into this pair
    expand: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # forms (up, down) when they are meta

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) with their values: as stored, or an adapter's pair formed now (not kept)."""
        return (self.up, self.down) if self.expand is None else self.expand()

    @property
    def down_key(self) -> str:
        return self.key_format.down_key(self.name, self.key_suffix)

    @property
    def up_key(self) -> str:
        return self.key_format.up_key(self.name, self.key_suffix)

    @property
    def alpha_key(self) -> str:
        return self.name + ALPHA_SUFFIX

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank, the factor kohya applies to up @ down."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.down.shape[2:4]) if self.is_conv else (1, 1)  # type: ignore[return-value]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the dense delta this module adds: (out, in) or (out, in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    ignored_keys: list[str] = field(default_factory=list)
    other_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the ignored keys' tensors

    @property
    def title(self) -> str:
        """What kohya's modelspec.merged_from calls this file: its own title, else its stem."""
        return self.metadata.get("modelspec.title") or self.path.stem


@dataclass
class _Loaded:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    all_floats_finite: bool = False  # True: checked in bulk, no tensor needs its own check


def _load_tensors(path: Path) -> _Loaded:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            contents = read_safetensors(path)
            if contents is not None:
                finite = all(is_finite(run) for run in contents.float_runs)
                return _Loaded(contents.tensors, contents.metadata, finite)
            # a file copylora's reader does not vouch for: safetensors reads it, or says what is wrong
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return _Loaded(load_file(str(path)), metadata)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CopyloraError(f"{path}: not a valid safetensors file ({_first_line(exc)})") from exc
    if suffix in PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: the error says it all
                warnings.simplefilter("ignore")
                loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CopyloraError(
                f"{path}: refused to load: torch.load(weights_only=True) found more than tensors in it "
                f"({_weights_only_reason(exc)}); loading it fully could run arbitrary code, so copylora does not"
            ) from exc
        except Exception as exc:  # a corrupt zip or pickle fails anywhere in torch.load, as any error type
            raise CopyloraError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from exc
        if not isinstance(loaded, Mapping):
            raise CopyloraError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
        return _Loaded({str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, {})
    raise CopyloraError(f"{path}: unsupported file type {path.suffix!r} (use {LORA_FILE_TYPES})")


# the paragraphs of torch's weights_only refusal that are the same for every file
_WEIGHTS_ONLY_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _weights_only_reason(exc: BaseException) -> str:
    """The line of torch's long weights_only refusal that names the problem, e.g. `Trying to load
    unsupported GLOBAL posix.system ...` or `Unsupported operand 149`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_WEIGHTS_ONLY_BOILERPLATE)]
    return reasons[0][:200] if reasons else type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def read_lora(path: str | os.PathLike[str], key_formats: tuple[KeyFormat, ...] = (KOHYA_KEYS,)) -> LoraFile:
    """Load and validate a LoRA file; raises CopyloraError naming the file on any problem.

    key_formats: the pair names to recognise, first match wins (the merge reads kohya's only,
    like svd_merge_lora.py; the resize reads all of KEY_FORMATS, like resize_lora.py).
    """
    path = Path(path)
    if not path.exists():
        raise CopyloraError(f"{path}: no such file")
    if not path.is_file():
        raise CopyloraError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise CopyloraError(f"{path}: not readable (permission denied)")
    loaded = _load_tensors(path)
    tensors, metadata = loaded.tensors, loaded.metadata

    refused = refused_kind(list(tensors))
    if refused is not None:
        raise CopyloraError(f"{path}: {refused[1]} ({refused[0]}); copylora reads LoRA/LoCon, LoHa and LoKr")

    modules: dict[str, LoraModule] = {}
    used: set[str] = set()
    for key in tensors:
        found = _down_key_parts(key, key_formats)
        if found is None:
            continue
        name, key_format, suffix = found
        up_key, alpha_key = key_format.up_key(name, suffix), name + ALPHA_SUFFIX
        if up_key not in tensors:
            if not key_format.strict:
                continue
            raise CopyloraError(f"{path}: module {name} has {key_format.down} but no {key_format.up}")
        module = _validated_module(path, name, tensors[key], tensors[up_key], tensors.get(alpha_key),
                                   check_finite=not loaded.all_floats_finite)
        mid_key = f"{name}.lora_mid{suffix}"
        if mid_key in tensors:  # LyCORIS' Tucker LoCon: a core between down and up
            module = _tucker_locon(path, module, tensors[mid_key], check_finite=not loaded.all_floats_finite)
            used.add(mid_key)
        modules[name] = dataclasses.replace(module, key_format=key_format, key_suffix=suffix)
        used.update((key, up_key, alpha_key))

    adapters, adapter_keys = _adapter_lora_modules(path, tensors, metadata, not loaded.all_floats_finite)
    for name, module in adapters.items():
        if name in modules:
            raise CopyloraError(f"{path}: module {name} has both lora_down/lora_up and {module.adapter} keys")
        modules[name] = module
    used.update(adapter_keys)

    if not modules:
        raise CopyloraError(
            f"{path}: no lora_down/lora_up pairs found ({len(tensors)} tensors): not a LoRA "
            "(a checkpoint or an embedding?)"
        )
    for key_format in (f for f in key_formats if f.strict):
        orphan_up = next((k for k in tensors if _is_pair_key(k, key_format.up) and k not in used), None)
        if orphan_up is not None:
            name = orphan_up.rsplit("." + key_format.up, 1)[0]
            raise CopyloraError(f"{path}: module {name} has {key_format.up} but no {key_format.down}")
    ignored = sorted(k for k in tensors if k not in used)
    return LoraFile(
        path=path, modules=modules, metadata=metadata, ignored_keys=ignored,
        other_tensors={k: tensors[k] for k in ignored},
    )


def _down_key_parts(key: str, key_formats: tuple[KeyFormat, ...]) -> tuple[str, KeyFormat, str] | None:
    """(module name, format, suffix) when key names a down factor: NAME.<down>.weight or NAME.<down>."""
    parts = key.split(".")
    for key_format in key_formats:
        if len(parts) >= 2 and parts[-2] == key_format.down:
            return ".".join(parts[:-2]), key_format, "." + parts[-1]
        if parts[-1] == key_format.down:
            return ".".join(parts[:-1]), key_format, ""
    return None


def _is_pair_key(key: str, word: str) -> bool:
    parts = key.split(".")
    return parts[-1] == word or (len(parts) >= 2 and parts[-2] == word)


def _adapter_lora_modules(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], check_finite: bool
) -> tuple[dict[str, LoraModule], set[str]]:
    """The file's LoHa/LoKr modules, each as the exact lora_up/lora_down pair of its delta, formed on
    demand, and their keys. Every check runs now, on meta copies of the tensors (no data)."""

    def alpha_of(name: str) -> float | None:
        alpha = tensors.get(name + ALPHA_SUFFIX)
        return None if alpha is None else _alpha_value(path, name, alpha)

    shapes_only = {key: tensor.to("meta") for key, tensor in tensors.items()}
    try:
        found, used = adapter_modules(shapes_only, alpha_of)
    except AdapterProblem as problem:
        raise CopyloraError(f"{path}: {problem}") from None
    if check_finite:
        bad = next((k for k in sorted(used) if tensors[k].is_floating_point() and not is_finite(tensors[k])), None)
        if bad is not None:
            raise CopyloraError(f"{path}: module {bad.rpartition('.')[0]}: {bad} contains NaN or Inf")
    v2 = metadata.get("ss_v2") == "True"
    modules = {}
    for name, (adapter, shapes) in found.items():
        kernel = _kernel(name, shapes, v2)
        form = functools.partial(_kohya_layout_of, adapter, tensors, kernel)
        up, down = _kohya_layout(shapes, kernel)
        modules[name] = LoraModule(name=name, down=down, up=up, alpha=shapes.scale * shapes.up.shape[1],
                                   adapter=adapter.kind, expand=form)
    return modules, used


def _kohya_layout_of(adapter: AdapterModule, tensors: Mapping[str, torch.Tensor],
                     kernel: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter module's pair formed from the file's tensors, in kohya's layout."""
    return _kohya_layout(adapter.factors(tensors), kernel)


def _tucker_locon(path: Path, pair: LoraModule, mid: torch.Tensor, check_finite: bool) -> LoraModule:
    """A LoCon module with LyCORIS' lora_mid core, as the exact pair of its delta."""
    if check_finite and mid.is_floating_point() and not is_finite(mid):
        raise CopyloraError(f"{path}: module {pair.name}: lora_mid contains NaN or Inf")
    try:
        factors = tucker_factor_pair(pair.down, mid, pair.up, pair.alpha)
    except AdapterProblem as problem:
        raise CopyloraError(f"{path}: module {pair.name}: {problem}") from None
    return _as_lora_module(pair.name, "LoCon (Tucker)", factors, v2=False)


def _kernel(name: str, factors: FactorPair, v2: bool) -> tuple[int, int] | None:
    """A conv's kernel: from the tensors, else from the module's name (adapters store 1×1 and flat
    convs 2-D); None for a linear module or a down whose width the kernel does not divide."""
    kernel = factors.kernel or naming.conv_kernel(name, v2)
    return kernel if kernel is not None and factors.down.shape[1] % (kernel[0] * kernel[1]) == 0 else None


def _kohya_layout(factors: FactorPair, kernel: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in kohya's layout: a conv's down (R, in, kh, kw) and up (out, R, 1, 1)."""
    up, down, rank = factors.up, factors.down, factors.up.shape[1]
    if kernel is None:
        return up, down
    return up.reshape(up.shape[0], rank, 1, 1), down.reshape(rank, -1, *kernel)


def _as_lora_module(name: str, kind: str, factors: FactorPair, v2: bool) -> LoraModule:
    """The pair as a module, with alpha such that alpha / rank is the kind's own scale."""
    up, down = _kohya_layout(factors, _kernel(name, factors, v2))
    return LoraModule(name=name, down=down, up=up, alpha=factors.scale * factors.up.shape[1], adapter=kind)


def _alpha_value(path: Path, name: str, alpha: torch.Tensor) -> float:
    if alpha.numel() != 1:
        raise CopyloraError(f"{path}: module {name}: alpha must be a scalar, found shape {tuple(alpha.shape)}")
    value = float(alpha.reshape(()).item())
    if value != value or value in (float("inf"), float("-inf")):
        raise CopyloraError(f"{path}: module {name}: alpha is NaN or Inf")
    return value


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`: its least and greatest values, found in one pass (a NaN makes both
    NaN), are finite. No scratch memory, where a float32 sum of fp16 values made a float32 copy of
    them first (600 MB of a FLUX.1 merge's peak), and 6x faster than that sum on a CPU."""
    if tensor.numel() == 0:
        return True
    least, greatest = torch.aminmax(tensor)
    return bool(torch.isfinite(least)) and bool(torch.isfinite(greatest))


def _validated_module(
    path: Path, name: str, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None, check_finite: bool
) -> LoraModule:
    def bad(problem: str) -> CopyloraError:
        return CopyloraError(f"{path}: module {name}: {problem}")

    for label, tensor in (("lora_down", down), ("lora_up", up)):
        if not tensor.is_floating_point():
            raise bad(f"{label} has non-float dtype {tensor.dtype}")
        if check_finite and not is_finite(tensor):
            raise bad(f"{label} contains NaN or Inf")
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise bad(f"unsupported shapes lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise bad(f"lora_up must be 1x1, found kernel {tuple(up.shape[2:])}")
    if up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise bad(f"rank mismatch: lora_down {tuple(down.shape)} vs lora_up {tuple(up.shape)}")
    if down.numel() == 0 or up.numel() == 0:  # kohya would divide alpha by a rank of nothing
        raise bad(f"a factor has no values: lora_down {tuple(down.shape)}, lora_up {tuple(up.shape)}")
    return LoraModule(name=name, down=down, up=up, alpha=None if alpha is None else _alpha_value(path, name, alpha))


_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


@dataclass(frozen=True)
class SerializedTensors:
    """Tensors laid out exactly as safetensors lays them out, without building the bytes.

    The data section is the tensors' own memory, chunk by chunk: the sshs_* hashes (over the data,
    with an ss_*-only header) and the file (with the full header) both read it from there, so no
    copy of the output is made at all.
    """

    entries: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, in data order
    chunks: list[memoryview]  # the data section, tensor by tensor, in that order

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> "SerializedTensors":
        if any(t.dtype not in _DTYPE_RANK for t in tensors.values()):
            return cls._by_safetensors(tensors)
        entries, chunks, offset = {}, [], 0
        for name in sorted(tensors, key=lambda name: (-_DTYPE_RANK[tensors[name].dtype], name)):
            tensor = tensors[name].detach().cpu().contiguous()
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            entries[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [offset, offset + data.nbytes]}
            chunks.append(data)
            offset += data.nbytes
        return cls(entries=entries, chunks=chunks)

    @classmethod
    def _by_safetensors(cls, tensors: Mapping[str, torch.Tensor]) -> "SerializedTensors":
        """A dtype the table lacks (complex, packed float4, ...): safetensors' own bytes, one copy."""
        raw = save(dict(tensors))
        header_end = 8 + int.from_bytes(raw[:8], "little")
        index = json.loads(raw[8:header_end])
        index.pop("__metadata__", None)
        entries = dict(sorted(index.items(), key=lambda item: item[1]["data_offsets"][0]))
        return cls(entries=entries, chunks=[memoryview(raw)[header_end:]])

    def data_window(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the data section (clipped to it)."""
        window, position = [], 0
        for chunk in self.chunks:
            lo, hi = max(start - position, 0), min(end - position, chunk.nbytes)
            if lo < hi:
                window.append(chunk[lo:hi].tobytes())
            position += chunk.nbytes
            if position >= end:
                break
        return b"".join(window)

    def header(self, metadata: Mapping[str, str] | None) -> bytes:
        """A reproducible header: metadata keys sorted, tensors by offset, 8-byte aligned.

        safetensors writes its metadata map in a random order per call, so equal inputs would
        give different files; this header has the same length and meaning, in a fixed order.
        """
        ordered: dict[str, object] = {}
        if metadata:
            ordered["__metadata__"] = dict(sorted(metadata.items()))
        ordered.update(self.entries)
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data must start 8-byte aligned
        return len(text).to_bytes(8, "little") + text


def check_finite_output(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write NaN or Inf: values past the save dtype's range (alpha 3e38 as fp16, large
    ratios) would otherwise be saved as Inf without a word."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not is_finite(tensor):
            hint = " (--save_precision float or bf16 have the range fp16 lacks)" if tensor.dtype == torch.float16 else ""
            raise CopyloraError(
                f"{path}: {key} would be saved as NaN or Inf in {str(tensor.dtype).removeprefix('torch.')}; "
                f"nothing was written{hint}"
            )


DataHashes = Callable[["SerializedTensors", Mapping[str, str]], Mapping[str, str]]


def write_lora(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    serialized: SerializedTensors | None = None,
    data_hashes: DataHashes | None = None,
) -> None:
    """Write a LoRA like stock: safetensors with metadata, or torch.save for .ckpt/.pt/.pth.

    serialized: `tensors` already serialized, written as they are.
    data_hashes(serialized, metadata): metadata values that are hashes of the data (kohya's
    sshs_*). They are computed in a thread while the data is written, and replace placeholders
    of the same length in `metadata`; the header, which holds them, is written last.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    check_finite_output(path, tensors)
    if suffix in SAFETENSORS_SUFFIXES:
        layout = serialized or SerializedTensors.of(tensors)

        given = dict(metadata or {})

        def write(tmp: str) -> None:
            header_size = len(layout.header(given))
            with open(tmp, "wb") as handle, ThreadPoolExecutor(max_workers=1) as hashing:
                hashes = hashing.submit(data_hashes, layout, given) if data_hashes else None
                handle.seek(header_size)
                for chunk in layout.chunks:  # hashlib and the writes both let go of the GIL
                    handle.write(chunk)
                header = layout.header({**given, **hashes.result()} if hashes else given)
                if len(header) != header_size:
                    raise ValueError(f"{path}: a hash longer than its placeholder changed the header's size")
                handle.seek(0)
                handle.write(header)
                handle.flush()
                os.fsync(handle.fileno())

    elif suffix in PICKLE_SUFFIXES:

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a file object: a failed write is the OSError itself
                torch.save(dict(tensors), handle)

    else:
        raise CopyloraError(f"{path}: unsupported output type {path.suffix!r} (use {LORA_FILE_TYPES})")
    atomic_write(path, write)
