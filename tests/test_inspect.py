"""copylora.inspect: per-module fidelity numbers against an independent dense computation, the
block table and totals (the same as merge --report), the spectrum plot, and bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from copylora import inspect as inspect_cli
from copylora.formats.lora_file import write_lora
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.inspect import main as inspect_main
from copylora.merge import main as merge_main
from copylora.pipelines.fidelity import Summary, block_summaries
from copylora.pipelines.inspection import inspect_lora
from tests.conftest import golden_folder

LAYOUT = [
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 256, 192),
    ModuleShape("lora_unet_down_blocks_1_attentions_0_proj_in", 128, 128, (1, 1)),
    ModuleShape("lora_unet_up_blocks_2_resnets_0_conv1", 64, 32, (3, 3)),
    ModuleShape("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q", 96, 160),
]
RATIOS = [1.0, -0.5]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for index, (dim, alpha) in enumerate(((6, 3.0), (4, 4.0))):
        path = folder / f"in{index}.safetensors"
        tensors = random_lora(LAYOUT, dim, alpha, seed=20 + index, dtype=torch.float32)
        write_lora(path, tensors, {"ss_network_dim": str(dim)})
        paths.append(path)
    return paths


def merge(inputs: list[Path], out: Path, *extra: str) -> str:
    """Run the merge CLI with --report; return its last line."""
    args = ["--models", *map(str, inputs), "--ratios", *map(str, RATIOS), "--save_to", str(out), "--quiet", "--report"]
    assert merge_main([*args, "--new_rank", "6", "--new_conv_rank", "4", "--save_precision", "fp16", *extra]) == 0
    return out


def dense_delta(inputs: list[Path], name: str) -> torch.Tensor:
    total = 0
    for path, ratio in zip(inputs, RATIOS):
        tensors = load_file(str(path))
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        rank = down.shape[0]
        total = total + ratio * float(tensors[f"{name}.alpha"]) / rank * up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return total


def dense_expectations(delta: torch.Tensor, saved: dict[str, torch.Tensor], name: str, quantile: float) -> dict[str, float]:
    """Every number of the report for one module, from the dense matrix and its full SVD."""
    up_file, down_file = saved[f"{name}.lora_up.weight"], saved[f"{name}.lora_down.weight"]
    rank = down_file.shape[0]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    signs = torch.sign(u[u.abs().argmax(dim=0), torch.arange(u.shape[1])])  # the engines' sign convention
    u, vh = u * signs, vh * signs[:, None]
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    best = up @ down
    if quantile < 1:
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    clamped = up @ down
    rounded = up.half().double() @ down.half().double()
    saved_delta = up_file.double().reshape(up_file.shape[0], rank) @ down_file.double().reshape(rank, -1)
    norm = delta.norm()
    return {
        "energy": float(norm**2),
        "retained": float(s[:rank].square().sum() / s.square().sum()),
        "clamp": float((clamped - best).norm() / norm),
        "rounding": float((rounded - clamped).norm() / norm),
        "error": float((saved_delta - delta).norm() / norm),
    }


def test_numbers_match_a_dense_computation(tmp_path, inputs):
    out = merge(inputs, tmp_path / "out.safetensors")
    inspection = inspect_lora(out, inputs, RATIOS)
    assert inspection.settings.clamp_quantile == 0.99 and not inspection.settings.sqrt_split
    saved = load_file(str(out))
    expected = {}
    for module in inspection.fidelity:
        want = dense_expectations(dense_delta(inputs, module.name), saved, module.name, 0.99)
        expected[module.name] = want
        assert module.energy == pytest.approx(want["energy"], rel=1e-9)
        assert module.kept_energy / module.energy == pytest.approx(want["retained"], rel=1e-9)
        assert want["retained"] < 1.0  # R = 10 > 6 and 4: truncation really loses something
        assert math.sqrt(module.clamp_sq / module.energy) == pytest.approx(want["clamp"], rel=1e-3)
        assert want["clamp"] > 1e-3  # and the clamp really changes something
        assert math.sqrt(module.rounding_sq / module.energy) == pytest.approx(want["rounding"], rel=5e-2)
        assert module.relative_error == pytest.approx(want["error"], rel=1e-6)

    # block rows and totals are energy-weighted over their modules
    total = Summary("total", inspection.fidelity)
    energy = sum(w["energy"] for w in expected.values())
    assert total.retained == pytest.approx(sum(w["retained"] * w["energy"] for w in expected.values()) / energy, rel=1e-9)
    assert total.error == pytest.approx(math.sqrt(sum(w["error"] ** 2 * w["energy"] for w in expected.values()) / energy), rel=1e-6)
    assert total.worst_error == pytest.approx(max(w["error"] for w in expected.values()), rel=1e-6)
    assert [b.label for b in block_summaries(inspection.fidelity)] == ["te", "down_1", "mid", "up_2"]  # U-Net order


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("extra", "quantile", "sqrt_split"),
    [([], 0.99, False), (["--clamp_quantile", "1"], 1.0, False), (["--split_sv", "--clamp_quantile", "0.95"], 0.95, True)],
)
def test_cli_reads_the_settings_off_the_file_and_agrees_with_merge_report(tmp_path, inputs, capsys, extra, quantile, sqrt_split):
    out = merge(inputs, tmp_path / "out.safetensors", *extra)
    merge_totals = last_line(capsys.readouterr().out).split("; ", 1)[1]
    plot = tmp_path / "spectrum.png"
    args = [str(out), "--against", *map(str, inputs), "--ratios", *map(str, RATIOS), "--plot", str(plot)]
    assert inspect_main(args) == 0
    printed = capsys.readouterr().out
    assert f"clamp_quantile {quantile:g} (read off the file)" in printed
    assert ("sqrt(S) split" in printed) == sqrt_split
    assert last_line(printed) == merge_totals  # the same totals as merge --report
    with Image.open(plot) as image:
        image.verify()
        assert image.format == "PNG"
    with Image.open(plot) as image:
        assert image.width > 300 and image.height > 100


@pytest.mark.parametrize("split", [False, True], ids=["stock-split", "sqrt-split"])
def test_a_dynamic_merge_with_one_alpha_reads_like_any_other(tmp_path, inputs, capsys, split):
    """A dynamic merge writes one alpha and folds rank/alpha into each up; inspect undoes the fold,
    so it still reads the clamp and split off the file and gives merge --report's totals."""
    extra = ["--dynamic_method", "sv_fro", "--dynamic_param", "0.9", *(["--split_sv"] if split else [])]
    out = merge(inputs, tmp_path / "out.safetensors", *extra)
    merge_totals = last_line(capsys.readouterr().out).split("; ", 1)[1]
    saved = load_file(str(out))
    alphas = {int(v) for k, v in saved.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in saved.items() if k.endswith(".lora_down.weight")}
    assert len(alphas) == 1 and len(ranks) > 1  # one alpha, so some ups really carry a folded factor
    assert inspect_main([str(out), "--against", *map(str, inputs), "--ratios", *map(str, RATIOS)]) == 0
    printed = capsys.readouterr().out
    assert "clamp_quantile 0.99 (read off the file)" in printed
    assert ("sqrt(S) split" in printed) == split
    assert last_line(printed) == merge_totals


def test_without_inputs_shows_ranks_per_block(tmp_path, inputs, capsys):
    out = merge(inputs, tmp_path / "out.safetensors")
    capsys.readouterr()
    assert inspect_main([str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line and line.split()[0] in {"te", "up_2", "total"}}
    assert rows["te"][1:3] == ["1", "6"] and rows["up_2"][1:3] == ["1", "4"] and rows["total"][1:3] == ["4", "4-6"]
    assert "--against" in printed


def test_stock_sdxl_file(capsys):
    """A stock output in SDXL's layout: te1/te2/input/middle/output blocks, stock's clamp read off it."""
    folder = golden_folder("golden", "sdxl_subset").path  # whole stock file (tests/data)
    inspection = inspect_lora(folder / "stock_r16.safetensors", [folder / "B.safetensors", folder / "A.safetensors"], [1, -1])
    assert (inspection.settings.clamp_quantile, inspection.settings.sqrt_split) == (0.99, False)
    labels = [b.label for b in block_summaries(inspection.fidelity)]
    assert {"te1", "te2", "mid"} <= set(labels) and any(l.startswith("in_") for l in labels) and any(l.startswith("out_") for l in labels)
    total = Summary("total", inspection.fidelity)
    assert total.retained == pytest.approx(1.0)  # rank 16 = R: all of it, only the clamp loses
    assert 0.01 < total.clamp_loss and total.error == pytest.approx(total.clamp_loss, rel=0.05)


@pytest.fixture
def run(capsys):
    def run_inspect(*args: str) -> tuple[int, str]:
        code = inspect_main(list(args))
        return code, capsys.readouterr().err.strip()

    return run_inspect


def test_bad_inputs(tmp_path, inputs, run):
    out = merge(inputs, tmp_path / "out.safetensors")
    against = ["--against", *map(str, inputs)]

    def refused(result: tuple[int, str], *needles: str) -> None:
        code, err = result
        assert code == 2 and len(err.splitlines()) == 1, err
        for needle in needles:
            assert needle in err, err

    refused(run(str(tmp_path / "missing.safetensors")), "missing.safetensors: no such file")
    refused(run(str(out), *against, "--ratios", "1"), "--ratios: 1 values for 2")
    refused(run(str(out), *against), "--ratios: 0 values for 2")
    refused(run(str(out), "--ratios", "1", "-1"), "--ratios: give --against")
    refused(run(str(out), *against, "--ratios", "1", "-1", "--clamp_quantile", "0"), "--clamp_quantile")
    refused(run(str(out), "--plot", str(tmp_path / "spectrum.jpg")), "spectrum.jpg: unsupported plot type")
    refused(run(str(out), "--plot", str(tmp_path / "nowhere" / "s.png")), "does not exist")

    # inputs that do not make this file: other modules, other shapes
    other = tmp_path / "other.safetensors"
    write_lora(other, random_lora(LAYOUT[:2], 4, 4.0, seed=7, dtype=torch.float32), {})
    refused(run(str(out), "--against", str(other), "--ratios", "1"), "out.safetensors", "in none of the --against models")
    bigger = [ModuleShape(m.name, m.out_features * 2, m.in_features, m.kernel) for m in LAYOUT]
    wrong = tmp_path / "wrong.safetensors"
    write_lora(wrong, random_lora(bigger, 4, 4.0, seed=8, dtype=torch.float32), {})
    refused(run(str(out), "--against", str(wrong), "--ratios", "1"), "has shape", "not merged from these models")


def test_plot_without_matplotlib_fails_before_the_work(tmp_path, inputs, run, monkeypatch):
    out = merge(inputs, tmp_path / "out.safetensors")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails like an uninstalled package

    def no_work(*args, **kwargs):
        raise AssertionError("inspect ran before finding that it cannot plot")

    monkeypatch.setattr(inspect_cli, "inspect_lora", no_work)
    code, err = run(str(out), "--plot", str(tmp_path / "s.png"))
    assert code == 2 and "needs matplotlib" in err and "pip install matplotlib" in err and "[plot]" in err
    assert "Traceback" not in err
    assert not (tmp_path / "s.png").exists()
