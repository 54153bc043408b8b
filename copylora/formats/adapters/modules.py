"""A file's LoHa/LoKr modules, grouped by module name, and the adapter kinds refused by name.

Keys are LyCORIS' (kohya's LoHa/LoKr use them too): `NAME.hada_w1_a`, `NAME.lokr_w1`, ... and
`NAME.alpha`. A module is one kind; a key of that module that the kind does not define is named
in the refusal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from copylora.formats.adapters import AdapterProblem, FactorPair, loha, lokr

# kind -> (its keys, its reader)
KINDS: dict[str, tuple[frozenset[str], Callable[[dict[str, torch.Tensor], float | None], FactorPair]]] = {
    "LoHa": (loha.KEYS, loha.factor_pair),
    "LoKr": (lokr.KEYS, lokr.factor_pair),
}

# Last key parts of adapters that are not a sum of products (so no factors to merge), and why.
REFUSED = {
    "dora_scale": "DoRA (dora_scale): its delta is a rescaling of the base model's weights, so it cannot be "
    "merged or converted without them",
    "oft_blocks": "OFT/BOFT (oft_blocks): a rotation of the base model's weights, not an added delta",
    "on_input": "IA³ (on_input): a scaling of the base model's weights, not an added delta",
    "a1.weight": "GLoRA (a1/a2/b1/b2): its delta depends on the base model's weights",
    "w_norm": "LyCORIS norm (w_norm): a change of normalisation weights, not a LoRA",
}


def refused_kind(keys: list[str]) -> tuple[str, str] | None:
    """(key, why) for the first key of a kind copylora refuses, or None."""
    for key in keys:
        for ending, why in REFUSED.items():
            if key == ending or key.endswith("." + ending):
                return key, why
    return None


def _kind_of(key: str) -> str | None:
    last = key.rsplit(".", 1)[-1]
    return next((kind for kind, (keys, _) in KINDS.items() if last in keys), None)


@dataclass(frozen=True)
class AdapterModule:
    """One LoHa/LoKr module of a file: its kind, its keys (last key part -> key) and its alpha."""

    kind: str
    keys: dict[str, str]
    alpha: float | None

    def factors(self, tensors: Mapping[str, torch.Tensor]) -> FactorPair:
        """The module as up · down · scale, from the file's tensors (meta ones give shapes only)."""
        _, reader = KINDS[self.kind]
        return reader({last: tensors[key] for last, key in self.keys.items() if last != "alpha"}, self.alpha)


def adapter_modules(
    tensors: Mapping[str, torch.Tensor], alpha_of: Callable[[str], float | None]
) -> tuple[dict[str, tuple[AdapterModule, FactorPair]], set[str]]:
    """{module name: (module, factors)} for every LoHa/LoKr module, and the keys they use.

    alpha_of(name): the module's alpha, validated by the caller. AdapterProblem messages start
    with the module name. Given meta tensors, every check runs and the factors are shapes only.
    """
    kinds: dict[str, str] = {}
    by_name: dict[str, dict[str, str]] = {}  # module name -> {last key part: key}
    for key in tensors:
        name, _, last = key.rpartition(".")
        by_name.setdefault(name, {})[last] = key
        kind = _kind_of(key)
        if kind is not None and kinds.setdefault(name, kind) != kind:
            raise AdapterProblem(f"module {name}: mixes {kinds[name]} and {kind} keys ({key})")
    modules: dict[str, tuple[AdapterModule, FactorPair]] = {}
    used: set[str] = set()
    for name, kind in kinds.items():
        keys, _ = KINDS[kind]
        own = by_name[name]
        unknown = sorted(own[last] for last in own if last not in keys and last != "alpha")
        if unknown:
            raise AdapterProblem(f"module {name}: {kind} with keys copylora does not know: {', '.join(unknown)}")
        module = AdapterModule(kind, own, alpha_of(name))
        try:
            modules[name] = (module, module.factors(tensors))
        except AdapterProblem as problem:
            raise AdapterProblem(f"module {name}: {problem}") from None
        used.update(own.values())
    return modules, used
