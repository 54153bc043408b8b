"""--dynamic_method / --dynamic_param: resize_lora's rank choice per module, written consistently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from copylora.formats.lora_file import write_lora
from copylora.merge import build_parser
from copylora.merge import main as merge_main
from copylora.pipelines.dynamic_rank import DYNAMIC_METHODS, dynamic_rank
from tests.conftest import GoldenFolder, golden_params, kohya_file
from tests.lora_compare import module_deltas, read_metadata, relative_error

S = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])


# Worked by hand from the definitions; resize_lora keeps one value past the threshold count.
@pytest.mark.parametrize(
    ("method", "param", "expected"),
    [
        ("sv_ratio", 4.0, 3),  # S > 10/4 = 2.5: {10, 5} -> 2, +1
        ("sv_ratio", 10.0, 4),  # S > 1: {10, 5, 2} -> 3, +1
        ("sv_ratio", 1.0, 2),  # S > 10: none -> at least 1, +1
        ("sv_fro", 0.9, 3),  # S² = 100, 25, 4, 1, .25, .01 (130.26): 125/130.26 = .96 >= .81 at 2, +1
        ("sv_fro", 0.5, 2),  # 100/130.26 = .77 >= .25 at 1, +1
        ("sv_fro", 0.99, 4),  # 125/130.26 = .960 < .9801 <= 129/130.26 = .990 at 3, +1
        ("sv_cumulative", 0.8, 3),  # ΣS = 18.6: 15/18.6 = .806 >= .8 at 2, +1
        ("sv_cumulative", 0.9, 4),  # 17/18.6 = .914 >= .9 at 3, +1
        ("sv_cumulative", 1.0, 6),  # all 6 -> 6 + 1, capped at the 6 available
    ],
)
def test_rank_from_known_spectrum(method, param, expected):
    assert dynamic_rank(S, max_rank=16, dense_size=320, method=method, param=param) == expected


def test_caps_and_zero_module():
    assert dynamic_rank(S, max_rank=2, dense_size=320, method="sv_cumulative", param=0.9) == 2  # --new_rank caps
    assert dynamic_rank(torch.zeros(6), 16, 320, "sv_fro", 0.9) == 1  # all-zero delta: rank 1
    assert dynamic_rank(torch.full((6,), 5e-7), 16, 320, "sv_ratio", 2.0) == 1  # below resize_lora's 1e-6
    # resize_lora never goes past its dense spectrum's length: index <= min(out, in) - 1
    assert dynamic_rank(torch.ones(4), 16, 3, "sv_ratio", 2.0) == 3


def definition_rank(values: list[int], method: str, param: float, max_rank: int) -> int:
    """The definitions written as loops over exact integers, independent of the implementation."""
    if method == "sv_ratio":
        needed = sum(1 for v in values if v > values[0] / param)
    else:
        weights = [v * v for v in values] if method == "sv_fro" else list(values)
        target = param**2 if method == "sv_fro" else param
        running, needed = 0, len(values)
        for count, w in enumerate(weights, start=1):
            running += w
            if running / sum(weights) >= target:
                needed = count
                break
    return min(max(needed, 1) + 1, max_rank, len(values))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(1, 10_000), min_size=1, max_size=24).map(lambda v: sorted(v, reverse=True)),
    method=st.sampled_from(DYNAMIC_METHODS),
    fraction=st.floats(0.01, 1.0),
    ratio=st.floats(1.0, 1e4),
    max_rank=st.integers(1, 32),
)
def test_matches_the_definitions(values, method, fraction, ratio, max_rank):
    param = ratio if method == "sv_ratio" else fraction
    s = torch.tensor(values, dtype=torch.float64)
    assert dynamic_rank(s, max_rank, 1000, method, param) == definition_rank(values, method, param, max_rank)


# ---- through the merge: constructed modules with known spectra

LINEAR = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # 96 -> 64
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3, 16 -> 24
ZERO = "lora_unet_up_blocks_1_attentions_0_proj_in"  # 1x1 conv, all-zero delta
SPECTRA = {
    LINEAR: [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625],
    CONV: [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93],
    ZERO: [0.0] * 8,
}
SHAPES = {LINEAR: (64, 96, None), CONV: (24, 16, (3, 3)), ZERO: (32, 32, (1, 1))}


def module_with_spectrum(out: int, inp: int, kernel: tuple[int, int] | None, values: list[float], seed: int):
    """up (out, r), down (r, inp·kh·kw) with up @ down having exactly these singular values."""
    generator = torch.Generator().manual_seed(seed)
    flat_in = inp * (kernel[0] * kernel[1] if kernel else 1)
    rank = len(values)
    u, _ = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(flat_in, rank, generator=generator, dtype=torch.float64))
    up, down = (u * torch.tensor(values, dtype=torch.float64)).float().contiguous(), v.T.float().contiguous()
    if kernel:
        return up.reshape(out, rank, 1, 1), down.reshape(rank, inp, *kernel)
    return up, down


@pytest.fixture(scope="module")
def known_model(tmp_path_factory) -> Path:
    tensors = {}
    for seed, (name, values) in enumerate(SPECTRA.items()):
        out, inp, kernel = SHAPES[name]
        up, down = module_with_spectrum(out, inp, kernel, values, seed)
        tensors |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(8.0)}
    path = tmp_path_factory.mktemp("known") / "known.safetensors"
    write_lora(path, tensors, {"ss_network_dim": "8", "ss_base_model_version": "sd_v1", "ss_v2": "False"})
    return path


# what each method implies for the constructed spectra (conv cap 5, linear cap 16; zero -> 1)
EXPECTED = {
    ("sv_ratio", 10.0): {LINEAR: 5, CONV: 5, ZERO: 1},  # > 0.8: 8,4,2,1 -> 4 + 1; conv: all 8 -> capped at 5
    ("sv_fro", 0.95): {LINEAR: 3, CONV: 5, ZERO: 1},  # 80/85.33 = .9375 >= .9025 at 2 -> 3; conv ~8 -> 5
    ("sv_cumulative", 0.5): {LINEAR: 2, CONV: 5, ZERO: 1},  # 8/15.94 = .502 at 1 -> 2; conv 4 of 8 -> 5
}


def merge(model: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["--models", str(model), "--ratios", "1", "--save_to", str(out), "--new_rank", "16", "--new_conv_rank", "5"]
    return merge_main([*args, "--quiet", *extra])


def commonest_rank(ranks: list[int]) -> int:
    return max(set(ranks), key=lambda r: (ranks.count(r), r))


@pytest.mark.parametrize("alpha_layout", ["shared", "per-module"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(("method", "param"), list(EXPECTED), ids=[m for m, _ in EXPECTED])
def test_merge_writes_the_chosen_ranks(tmp_path, known_model, capsys, method, param, backend, alpha_layout):
    out = tmp_path / "dyn.safetensors"
    layout_flag = ["--per_module_alpha"] if alpha_layout == "per-module" else []
    code = merge(known_model, out, "--dynamic_method", method, "--dynamic_param", str(param), "--clamp_quantile", "1",
                 "--backend", backend, *layout_flag)
    assert code == 0
    tensors = load_file(str(out))
    expected = EXPECTED[(method, param)]
    # by default one alpha, the commonest rank, for every module; else alpha = rank, like stock's fixed rank
    shared = commonest_rank(list(expected.values())) if alpha_layout == "shared" else None
    for name, rank in expected.items():
        up, down, alpha = (tensors[f"{name}.{k}"] for k in ("lora_up.weight", "lora_down.weight", "alpha"))
        assert up.shape[1] == rank and down.shape[0] == rank, name
        assert alpha.dtype == torch.int64 and int(alpha) == (rank if shared is None else shared), name
        if name != ZERO:  # unclamped: exactly the best rank-k approximation of the known spectrum
            delta = int(alpha) / rank * up.double().reshape(up.shape[0], -1) @ down.double().reshape(rank, -1)
            kept = torch.linalg.svdvals(delta)[:rank]
            torch.testing.assert_close(kept, torch.tensor(SPECTRA[name][:rank], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    metadata = read_metadata(out)
    assert metadata["ss_network_dim"] == "Dynamic" and metadata["ss_network_alpha"] == "Dynamic"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    assert method in metadata["ss_training_comment"]
    counts: dict[int, int] = {}
    for rank in expected.values():
        counts[rank] = counts.get(rank, 0) + 1
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert ", ".join(f"rank {r}: {n}" for r, n in sorted(counts.items())) in summary


def test_clamped_modules_are_merged_at_their_chosen_rank(tmp_path, known_model):
    """With the stock clamp, a module's factors are those a fixed-rank merge at its chosen rank gives
    (the clamp quantile depends on the kept values, so truncating the first pass would be wrong)."""
    dynamic = tmp_path / "dyn.safetensors"
    assert merge(known_model, dynamic, "--dynamic_method", "sv_ratio", "--dynamic_param", "10", "--backend", "torch") == 0
    fixed = tmp_path / "fixed.safetensors"
    assert merge(known_model, fixed, "--new_rank", "5", "--backend", "torch") == 0
    ours, theirs = load_file(str(dynamic)), load_file(str(fixed))
    for key in (f"{LINEAR}.lora_up.weight", f"{LINEAR}.lora_down.weight"):
        torch.testing.assert_close(ours[key], theirs[key])
    first_pass = tmp_path / "cap.safetensors"
    assert merge(known_model, first_pass, "--backend", "torch") == 0  # rank 16 (8 available), clamped there
    assert not torch.equal(load_file(str(first_pass))[f"{LINEAR}.lora_up.weight"][:, :5], ours[f"{LINEAR}.lora_up.weight"])


@pytest.mark.parametrize("pair", golden_params("golden", per="folder", where=lambda f: f.name == "real_sd15"))
def test_dynamic_on_the_real_pair_keeps_what_it_promises(tmp_path, pair: GoldenFolder):
    """sv_fro P keeps at least P of each module's Frobenius norm (of the exact B − A)."""
    folder = pair.path
    out = tmp_path / "dyn.safetensors"
    args = ["--models", str(folder / "B.safetensors"), str(folder / "A.safetensors"), "--ratios", "1", "-1",
            "--new_rank", "16", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "--clamp_quantile", "1",
            "--save_to", str(out), "--quiet"]
    assert merge_main(args) == 0
    merged, a, b = (module_deltas(load_file(str(p))) for p in (out, folder / "A.safetensors", folder / "B.safetensors"))
    ranks = []
    for name, ours in merged.items():
        ranks.append(ours[1].shape[0])
        exact = (torch.cat([b[name][0], -a[name][0]], 1), torch.cat([b[name][1], a[name][1]], 0))
        if not exact[0].any():
            assert ranks[-1] == 1
            continue
        # ‖W − W_k‖² = (1 − kept energy)·‖W‖², and sv_fro 0.9 keeps >= 0.81 of the energy
        assert relative_error(ours, exact) <= (1 - 0.81) ** 0.5 + 1e-6, name
    assert 1 < len(set(ranks))  # ranks really vary per module
    assert max(ranks) <= 16


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--dynamic_param", "0.9"], "--dynamic_param: given without --dynamic_method"),
        (["--dynamic_method", "sv_fro"], "needs --dynamic_param"),
        (["--dynamic_method", "sv_fro", "--dynamic_param", "1.5"], "must be in (0, 1]"),
        (["--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"], "must be >= 1"),
    ],
)
def test_bad_dynamic_arguments(tmp_path, known_model, capsys, extra, needle):
    out = tmp_path / "never.safetensors"
    assert merge(known_model, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_new_flags_show_in_help_and_do_not_clash_with_kohya():
    kohya = json.loads(kohya_file("svd_merge_lora_args.json").read_text())
    kohya_flags = {flag for option in kohya["options"] for flag in option["flags"]}
    help_text = build_parser().format_help()
    for flag in ("--clamp_quantile", "--split_sv", "--dynamic_method", "--dynamic_param", "--per_module_alpha",
                 "--report"):
        assert flag in help_text and flag not in kohya_flags
    assert kohya_flags <= set(build_parser()._option_string_actions)  # and every kohya flag is still there
