"""LoHa and LoKr in merge and resize, against the dense delta computed with kohya's own formulas.

Synthetic files in kohya's key layout (LyCORIS' names): linear, 1×1 and 3×3 convs, Tucker cores,
full lokr_w2, lokr_w1_a/_b, both flat-conv layouts of lokr_w2_b. With --clamp_quantile 1 and enough
rank the merged or converted delta must be the reference within the save dtype's rounding, on
both backends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from copylora.merge import main as merge_main
from copylora.resize import main as resize_main
from tests.backend_compare import requires_ext

TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # IN01, linear 64×48
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # IN01, SD1 1×1 conv 32×32
CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # IN01, 3×3 conv 32×16
FF = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # OUT03, linear 40×80
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # BASE, linear 48×24
SHAPES = {TO_Q: (64, 48), PROJ_IN: (32, 32, 1, 1), CONV1: (32, 16, 3, 3), FF: (40, 80), TE: (48, 24)}
BACKENDS = [pytest.param("ext", marks=requires_ext), "torch"]


def rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * 0.3).to(torch.float16)


def columns(shape: tuple[int, ...]) -> int:
    return shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)


# ---------------------------------------------------------------- synthetic modules (kohya's layout)


def loha(gen, shape, rank, alpha, tucker=False):
    out = shape[0]
    if tucker:
        return {"hada_t1": rand(gen, rank, rank, *shape[2:]), "hada_w1_a": rand(gen, rank, out),
                "hada_w1_b": rand(gen, rank, shape[1]), "hada_t2": rand(gen, rank, rank, *shape[2:]),
                "hada_w2_a": rand(gen, rank, out), "hada_w2_b": rand(gen, rank, shape[1]), "alpha": torch.tensor(alpha)}
    cols = columns(shape)  # 1×1 and flat 3×3 convs are stored 2-D
    return {"hada_w1_a": rand(gen, out, rank), "hada_w1_b": rand(gen, rank, cols), "hada_w2_a": rand(gen, out, rank),
            "hada_w2_b": rand(gen, rank, cols), "alpha": torch.tensor(alpha)}


def lokr(gen, w1, w2, rank, alpha, kernel=None, w2b_4d=False):
    """w1: (out_l, in_m) with 'full' or 'ab'; w2: (out_k, in_n) with 'full', 'ab' or 'tucker'."""
    (kind1, (out_l, in_m)), (kind2, (out_k, in_n)) = w1, w2
    k = tuple(kernel or ())
    tensors = {"alpha": torch.tensor(alpha)}
    if kind1 == "full":
        tensors["lokr_w1"] = rand(gen, out_l, in_m)
    else:
        tensors |= {"lokr_w1_a": rand(gen, out_l, rank), "lokr_w1_b": rand(gen, rank, in_m)}
    if kind2 == "full":
        tensors["lokr_w2"] = rand(gen, out_k, in_n, *k)
    elif kind2 == "tucker":
        tensors |= {"lokr_t2": rand(gen, rank, rank, *k), "lokr_w2_a": rand(gen, rank, out_k),
                    "lokr_w2_b": rand(gen, rank, in_n)}
    else:
        n_k = 1 if not k else k[0] * k[1]
        w2b = rand(gen, rank, in_n * n_k)
        tensors |= {"lokr_w2_a": rand(gen, out_k, rank), "lokr_w2_b": w2b.reshape(rank, in_n, *k) if w2b_4d else w2b}
    return tensors


def lora(gen, shape, rank, alpha):
    down = rand(gen, rank, *shape[1:]) if len(shape) == 4 else rand(gen, rank, shape[1])
    up = rand(gen, shape[0], rank, 1, 1) if len(shape) == 4 else rand(gen, shape[0], rank)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(alpha)}


def loha_file(gen):
    return {TO_Q: loha(gen, SHAPES[TO_Q], 3, 1.5), PROJ_IN: loha(gen, SHAPES[PROJ_IN], 3, 3.0),
            CONV1: loha(gen, SHAPES[CONV1], 2, 1.0, tucker=True), FF: loha(gen, SHAPES[FF], 3, 0.0),
            TE: loha(gen, SHAPES[TE], 2, 4.0)}


def lokr_file(gen):
    return {
        TO_Q: lokr(gen, ("full", (8, 6)), ("ab", (8, 8)), 2, 1.0),  # kohya's usual form
        PROJ_IN: lokr(gen, ("full", (4, 4)), ("full", (8, 8)), 8, 3.0),  # both full: scale 1; dense path
        CONV1: lokr(gen, ("full", (4, 4)), ("tucker", (8, 4)), 2, 1.0, kernel=(3, 3)),
        FF: lokr(gen, ("ab", (5, 8)), ("ab", (8, 10)), 2, 1.0),  # LyCORIS decompose_both
        TE: lokr(gen, ("ab", (6, 4)), ("full", (8, 6)), 2, 0.5),  # LyCORIS: low-rank w1, full w2
    }


def lora_file(gen):
    return {name: lora(gen, shape, 2 if len(shape) == 4 else 4, 1.0) for name, shape in SHAPES.items()}


FLAT_CONVS = {  # resize-only: the other 3×3 layouts (no core; LyCORIS' Tucker LoCon)
    "loha_flat": lambda gen: {CONV1: loha(gen, SHAPES[CONV1], 2, 1.0)},
    "lokr_flat_kohya": lambda gen: {CONV1: lokr(gen, ("full", (4, 4)), ("ab", (8, 4)), 2, 1.0, kernel=(3, 3))},
    "lokr_flat_lycoris": lambda gen: {CONV1: lokr(gen, ("full", (4, 4)), ("ab", (8, 4)), 2, 1.0, kernel=(3, 3),
                                                  w2b_4d=True)},
    "lokr_full_w2_conv": lambda gen: {CONV1: lokr(gen, ("full", (4, 4)), ("full", (8, 4)), 2, 1.0, kernel=(3, 3))},
    "locon_tucker": lambda gen: {CONV1: {"lora_down.weight": rand(gen, 3, 16, 1, 1), "lora_mid.weight": rand(gen, 3, 3, 3, 3),
                                         "lora_up.weight": rand(gen, 32, 3, 1, 1), "alpha": torch.tensor(1.5)}},
}


def write(path: Path, modules: dict[str, dict[str, torch.Tensor]], module: str = "networks.loha") -> Path:
    save_file({f"{name}.{key}": t for name, keys in modules.items() for key, t in keys.items()}, str(path),
              {"ss_network_module": module, "ss_network_dim": "4", "ss_v2": "False", "ss_base_model_version": "sd_v1"})
    return path


# ---------------------------------------------------------------- kohya's formulas (networks/loha.py, lokr.py)


def kohya_delta(t: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    t = {k: v.float() for k, v in t.items()}
    alpha = t["alpha"].item()
    if "lora_mid.weight" in t:  # LyCORIS locon.py make_weight
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        wa, wb = up.view(up.size(0), -1).transpose(0, 1), down.view(down.size(0), -1)
        delta = torch.einsum("i j ..., i p, j r -> p r ...", t["lora_mid.weight"], wa, wb) * alpha / down.shape[0]
    elif "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * alpha / down.shape[0]
    elif "hada_w1_a" in t:
        dim = t["hada_w1_b"].shape[0]
        scale = 1.0 if alpha == 0 else alpha / dim  # LoHaModule: alpha 0 means alpha = dim
        if "hada_t1" in t:
            rebuild1 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
            rebuild2 = torch.einsum("i j ..., j r, i p -> p r ...", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            delta = rebuild1 * rebuild2 * scale
        else:
            delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2, dim = t["lokr_w2"], None
        elif "lokr_t2" in t:
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            dim = t["lokr_w2_a"].shape[0]
        else:
            w2b = t["lokr_w2_b"]
            w2 = t["lokr_w2_a"] @ w2b.reshape(w2b.shape[0], -1)
            dim = t["lokr_w2_a"].shape[1]
        if "lokr_w1_a" in t:
            dim = t["lokr_w1_a"].shape[1]  # LyCORIS' rule for the form kohya does not train
        scale = 1.0 if dim is None else alpha / dim
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        delta = torch.kron(w1, w2.contiguous()) * scale  # make_kron
    return delta.reshape(shape)


def saved_delta(path: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = load_file(str(path))
    down, up = t[f"{name}.lora_down.weight"].float(), t[f"{name}.lora_up.weight"].float()
    rank = down.shape[0]
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1) * t[f"{name}.alpha"].float() / rank).reshape(shape)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


FP16_TOLERANCE = 2e-3  # the factors rounded to fp16: a few 1e-4 of the delta


# ---------------------------------------------------------------- conversion (resize) and merge


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["loha", "lokr", *FLAT_CONVS])
def test_resize_converts_exactly_to_a_kohya_lora(tmp_path, case, backend):
    gen = torch.Generator().manual_seed(7)
    modules = {"loha": loha_file, "lokr": lokr_file, **FLAT_CONVS}[case](gen)
    source = write(tmp_path / "in.safetensors", modules)
    out = tmp_path / "out.safetensors"
    assert resize_main(["--model", str(source), "--save_to", str(out), "--new_rank", "4096", "--new_conv_rank", "4096",
                        "--save_precision", "fp16", "--backend", backend, "--quiet"]) == 0
    saved = load_file(str(out))
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in saved} == {"lora_down", "lora_up", "alpha"}
    for name, tensors in modules.items():
        shape = SHAPES[name]
        down = saved[f"{name}.lora_down.weight"]
        assert down.dim() == len(shape) and tuple(down.shape[1:]) == shape[1:], name  # kohya's conv layout
        assert relative_error(saved_delta(out, name, shape), kohya_delta(tensors, shape)) < FP16_TOLERANCE, name
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert "networks.loha" in metadata["copylora_converted_from"]
    assert metadata["ss_training_comment"].startswith("converted to LoRA by copylora; ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_of_loha_lokr_and_lora_is_exact(tmp_path, backend):
    gen = torch.Generator().manual_seed(11)
    files = [(loha_file(gen), 0.7), (lokr_file(gen), -1.3), (lora_file(gen), 0.5)]
    paths = [write(tmp_path / f"in{i}.safetensors", modules) for i, (modules, _) in enumerate(files)]
    out = tmp_path / "merged.safetensors"
    assert merge_main(["--models", *map(str, paths), "--ratios", *(str(r) for _, r in files), "--new_rank", "64",
                       "--new_conv_rank", "64", "--clamp_quantile", "1", "--save_precision", "fp16",
                       "--save_to", str(out), "--backend", backend, "--quiet"]) == 0
    for name, shape in SHAPES.items():
        expected = sum(ratio * kohya_delta(modules[name], shape) for modules, ratio in files)
        assert relative_error(saved_delta(out, name, shape), expected) < FP16_TOLERANCE, name
    with safe_open(str(out), "pt") as f:
        converted = f.metadata()["copylora_converted_from"]
    assert "in0: LoHa" in converted and "in1: LoHa" not in converted and "in2" not in converted


def test_lbws_weigh_loha_and_lokr_modules_by_block(tmp_path):
    gen = torch.Generator().manual_seed(5)
    files = [(loha_file(gen), 1.0), (lokr_file(gen), 1.0)]
    paths = [write(tmp_path / f"in{i}.safetensors", modules) for i, (modules, _) in enumerate(files)]
    # 17 blocks: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    first = [0.25] + [0.5] + [1.0] * 15  # BASE 0.25, IN01 0.5
    second = [1.0] * 8 + [2.0] + [1.0] * 8  # OUT03 2
    out = tmp_path / "merged.safetensors"
    assert merge_main(["--models", *map(str, paths), "--ratios", "1", "1", "--lbws", str(first), str(second),
                       "--new_rank", "64", "--new_conv_rank", "64", "--clamp_quantile", "1", "--save_to", str(out),
                       "--quiet"]) == 0
    block = {TO_Q: (0.5, 1.0), PROJ_IN: (0.5, 1.0), CONV1: (0.5, 1.0), FF: (1.0, 2.0), TE: (0.25, 1.0)}
    for name, shape in SHAPES.items():
        expected = sum(w * kohya_delta(modules[name], shape) for (modules, _), w in zip(files, block[name]))
        assert relative_error(saved_delta(out, name, shape), expected) < 1e-4, name


def test_factors_match_lycoris_own_functions():
    """LyCORIS' lycoris/functional (pip install lycoris-lora) rebuilds each layout's delta: the
    factor pairs give the same matrix (scale 1 here; the scale rules are kohya's, tested above)."""
    lycoris_loha = pytest.importorskip("lycoris.functional.loha", reason="needs lycoris-lora (pip install -e .[lycoris])")
    lycoris_lokr = pytest.importorskip("lycoris.functional.lokr")
    from copylora.formats.adapters import loha as copylora_loha, lokr as copylora_lokr

    gen = torch.Generator().manual_seed(1)
    f = {k: v.float() for k, v in loha(gen, (32, 24), 3, 3.0).items()}
    cases = [(lycoris_loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], None, None,
                                       gamma=torch.tensor(1.0)), copylora_loha.factor_pair(f, 3.0))]
    f = {k: v.float() for k, v in loha(gen, (32, 16, 3, 3), 2, 2.0, tucker=True).items()}
    cases.append((lycoris_loha.diff_weight(f["hada_w1_b"], f["hada_w1_a"], f["hada_w2_b"], f["hada_w2_a"], f["hada_t1"],
                                           f["hada_t2"], gamma=torch.tensor(1.0)), copylora_loha.factor_pair(f, 2.0)))
    for w1, w2, kernel, w2b_4d in [(("full", (4, 6)), ("ab", (8, 8)), None, False),
                                   (("ab", (4, 6)), ("full", (8, 8)), None, False),
                                   (("ab", (4, 6)), ("ab", (8, 8)), None, False),
                                   (("full", (4, 4)), ("ab", (8, 4)), (3, 3), True)]:
        f = {k: v.float() for k, v in lokr(gen, w1, w2, 2, 2.0, kernel=kernel, w2b_4d=w2b_4d).items()}
        weights = [f.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")]
        rank = 2 if weights[1] is not None or weights[4] is not None else 1.0
        cases.append((lycoris_lokr.diff_weight(*weights, None, gamma=rank), copylora_lokr.factor_pair(f, 2.0)))
    for reference, factors in cases:
        got = (factors.up @ factors.down * factors.scale).reshape(reference.shape)
        assert relative_error(got, reference) < 1e-5


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written


def refused(tmp_path, capsys, modules, *needles, command=resize_main):
    source = write(tmp_path / "bad.safetensors", modules)
    out = tmp_path / "out.safetensors"
    args = (["--model", str(source)] if command is resize_main else ["--models", str(source), "--ratios", "1"])
    assert command([*args, "--save_to", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.safetensors" in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_refusals(tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)
    good_lokr = lokr(gen, ("full", (8, 6)), ("ab", (8, 8)), 2, 1.0)
    refused(tmp_path, capsys, {TO_Q: {**good_lokr, "lokr_w2_b": rand(gen, 3, 8)}}, TO_Q, "inner sizes differ")
    refused(tmp_path, capsys, {TO_Q: {**loha(gen, SHAPES[TO_Q], 3, 1.0), "hada_w2_b": rand(gen, 4, 48),
                                      "hada_w2_a": rand(gen, 64, 4)}}, TO_Q, "LoHa ranks differ")
    refused(tmp_path, capsys, {CONV1: {**loha(gen, SHAPES[CONV1], 2, 1.0, tucker=True),
                                       "hada_t2": rand(gen, 3, 2, 3, 3)}}, CONV1, "Tucker core hada_t2")
    refused(tmp_path, capsys, {CONV1: {**lokr(gen, ("full", (4, 4)), ("tucker", (8, 4)), 2, 1.0, kernel=(3, 3)),
                                       "lokr_t2": rand(gen, 2, 3, 3, 3)}}, CONV1, "Tucker core lokr_t2")
    refused(tmp_path, capsys, {CONV1: {"lora_down.weight": rand(gen, 3, 16, 1, 1), "lora_mid.weight": rand(gen, 2, 3, 3, 3),
                                       "lora_up.weight": rand(gen, 32, 3, 1, 1)}}, CONV1, "Tucker core lora_mid")
    refused(tmp_path, capsys, {TO_Q: {**good_lokr, "lokr_w9": rand(gen, 2, 2)}}, f"{TO_Q}.lokr_w9", "does not know")
    refused(tmp_path, capsys, {TO_Q: {**good_lokr, "dora_scale": rand(gen, 64, 1)}}, "DoRA", "base model's weights")
    refused(tmp_path, capsys, {TO_Q: {"oft_blocks": rand(gen, 4, 16, 16), "alpha": torch.tensor(1.0)}}, "OFT",
            command=merge_main)
    refused(tmp_path, capsys, {TO_Q: {"weight": rand(gen, 48), "on_input": torch.tensor(True)}}, "IA³")
    refused(tmp_path, capsys, {TO_Q: {"a1.weight": rand(gen, 4, 48), "a2.weight": rand(gen, 64, 4)}}, "GLoRA")
    refused(tmp_path, capsys, {TO_Q: {**good_lokr, "hada_w1_a": rand(gen, 64, 2)}}, "mixes", command=merge_main)
