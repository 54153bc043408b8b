"""`copylora compare BEFORE AFTER [--json] [--out heatmap.png]`: the preview's measures for any two pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from copylora import cli, compare
from copylora.reports import image_measures


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    """A colourful picture and the same with its left half turned to Rec. 601 grey."""
    colour = np.random.default_rng(2).integers(0, 256, (12, 16, 3)).repeat(4, axis=0).repeat(4, axis=1).astype(np.uint8)
    grey = colour.copy()
    grey[:, :32] = (colour[:, :32] @ [0.299, 0.587, 0.114]).round()[..., None].astype(np.uint8)
    before, after = tmp_path / "before.png", tmp_path / "after.png"
    Image.fromarray(colour).save(before)
    Image.fromarray(grey).save(after)
    return before, after


def test_json_and_heatmap(pair, tmp_path, capsys):
    heatmap_path = tmp_path / "heat.png"
    assert cli.main(["compare", *map(str, pair), "--json", "--out", str(heatmap_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    measures, delta_e = image_measures.compare(*map(image_measures.read_rgb, pair))
    assert result == {"before": str(pair[0]), "after": str(pair[1]), **measures.as_dict(),
                      "changed_delta_e": image_measures.CHANGED_DELTA_E}
    assert result["delta_chroma"] < -10 and 0.4 < result["changed_share"] <= 0.5  # the left half lost its colour
    heat = image_measures.read_rgb(heatmap_path)
    assert np.array_equal(heat, image_measures.heatmap(delta_e))
    assert heat[:, :32].any() and not heat[:, 32:].any()


def test_text_output(pair, capsys):
    assert compare.main([str(p) for p in pair]) == 0
    lines = capsys.readouterr().out.splitlines()
    measures, _ = image_measures.compare(*map(image_measures.read_rgb, pair))
    assert lines[0].startswith("structure kept (SSIM of L*):") and lines[0].endswith(f"{measures.structure_kept:.3f}")
    assert lines[2].endswith(image_measures.signed(measures.delta_chroma, 2)) and len(lines) == 4


def bad_inputs(pair: tuple[Path, Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    before, after = pair
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    small = tmp_path / "small.png"
    Image.new("RGB", (16, 8)).save(small)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5)).save(tiny)
    return {
        "missing": ([str(before), str(tmp_path / "nope.png")], f"{tmp_path / 'nope.png'}: no such file"),
        "not an image": ([str(text), str(after)], f"{text}: not an image Pillow can read"),
        "different sizes": ([str(before), str(small)], f"{small}: 16x8 pixels, but {before} is 64x48"),
        "too small": ([str(tiny), str(tiny)], "smaller than SSIM's 7-pixel window"),
        "heatmap not png": ([str(before), str(after), "--out", str(tmp_path / "heat.jpg")], "heat.jpg: the heatmap is "
                            "written as PNG"),
        "heatmap folder missing": ([str(before), str(after), "--out", str(tmp_path / "no" / "heat.png")],
                                   "does not exist"),
        "heatmap over an input": ([str(before), str(after), "--out", str(after)], "one of the pictures compared"),
    }


@pytest.mark.parametrize("case", ["missing", "not an image", "different sizes", "too small", "heatmap not png",
                                  "heatmap folder missing", "heatmap over an input"])
def test_bad_input_is_one_line_and_exit_2(pair, tmp_path, capsys, case):
    argv, message = bad_inputs(pair, tmp_path)[case]
    pictures = {path: path.read_bytes() for path in pair}
    assert compare.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err
    assert not list(tmp_path.glob("**/.heat*"))  # no half-written heatmap left
    assert {path: path.read_bytes() for path in pair} == pictures
