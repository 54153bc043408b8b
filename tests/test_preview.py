"""`copylora preview` against a stand-in gen_img.py (tests/kohya_tool_fakes.py): command line, prompts file, grid,
scores and difference column."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from copylora import cli, preview
from copylora.reports import grid, image_measures
from tests.kohya_tool_fakes import add_tools
from tests.test_train_fakes import PYTHON, FakeKohya, read_log, write_tiny_lora


class Kohya(FakeKohya):
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        super().__init__(tmp_path, monkeypatch)
        add_tools(self.sd_scripts)
        for name in ("FAKE_GEN_EXIT", "FAKE_GEN_SKIP"):
            monkeypatch.delenv(name, raising=False)
        self.lora = tmp_path / "edit.safetensors"
        write_tiny_lora(self.lora)
        self.out = tmp_path / "preview"

    def args(self, *extra: str) -> list[str]:
        return ["--sd-scripts", str(self.sd_scripts), "--base", str(self.base), "--lora", str(self.lora),
                "--out", str(self.out), "--python", PYTHON, "--width", "16", "--height", "24", *extra]

    def gen_runs(self) -> list[dict]:
        return [run for run in read_log(self.log) if run["script"] in ("gen_img.py", "sdxl_gen_img.py")]


@pytest.fixture
def kohya(tmp_path, monkeypatch) -> Kohya:
    return Kohya(tmp_path, monkeypatch)


def test_dry_run_prints_the_command_and_the_prompts(kohya, capsys):
    assert preview.main(kohya.args("--dry-run", "--strengths", "-1", "0", "1", "--seeds", "5", "--", "--sampler",
                                   "euler")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (f"{PYTHON} gen_img.py --ckpt {kohya.base} --outdir {kohya.out / '.gen_img'} --from_file "
                      f"{kohya.out / 'prompts.txt'} --network_module networks.lora --network_weights {kohya.lora} "
                      "--network_mul 1 --W 16 --H 24 --steps 20 --sequential_file_name --sampler euler")
    assert out[-3:] == ["() --am -1 --d 5", "() --am 0 --d 5", "() --am 1 --d 5"]
    assert not kohya.out.exists() and kohya.gen_runs() == []


def cell_of(sheet: Image.Image, layout: dict, r: int, c: int) -> Image.Image:
    (x0, y0), (w, h) = layout["origin"], layout["cell"]
    x, y = x0 + c * layout["column_step"], y0 + r * layout["row_step"]
    return sheet.crop((x, y, x + w, y + h))


def test_grid_of_every_strength_and_seed(kohya, capsys):
    assert cli.main(["preview", *kohya.args("--seeds", "1", "2", "--strengths", "0", "0.5", "1", "-0.5",
                                            "--prompt", "a cat --n blurry")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == str(kohya.out / "grid.png") and ": medians over 2 image(s) per strength, against strength 0: strength 0.5: structure" in out[-1]
    (run,) = kohya.gen_runs()
    assert run["cwd"] == str(kohya.sd_scripts) and (run["W"], run["H"], run["steps"]) == (16, 24, 20)
    assert [(c["prompt"], c["options"], c["seed"], c["am"]) for c in run["cells"][:2]] == [
        ("a cat", ["n blurry", "am 0"], 1, 0.0), ("a cat", ["n blurry", "am 0.5"], 1, 0.5)]
    assert [(c["seed"], c["am"]) for c in run["cells"]] == [(s, m) for s in (1, 2) for m in (0, 0.5, 1, -0.5)]

    layout = grid.read_layout(kohya.out / "grid.png")
    assert layout["rows"] == ["seed 1", "seed 2"]
    assert layout["columns"] == ["strength 0", "strength 0.5", "strength 1", "strength -0.5", "dE 1 vs 0"]
    kept = sorted(p.name for p in (kohya.out / "images").glob("*.png"))
    assert len(kept) == 8 and "p00_seed2_strength-0.5.png" in kept and not (kohya.out / ".gen_img").exists()
    assert [Path(row[-1]) for row in layout["images"]] == [kohya.out / "differences" / "p00_seed1_strength+1.png",
                                                           kohya.out / "differences" / "p00_seed2_strength+1.png"]
    sheet = Image.open(kohya.out / "grid.png").convert("RGB")
    (x0, y0), (w, h) = layout["origin"], layout["cell"]
    assert (w, h) == (16 * 8, 24 * 8)  # enlarged 8x to at least 128 px
    for r, row in enumerate(layout["images"]):
        for c, path in enumerate(row):
            single = Image.open(path).convert("RGB")
            assert cell_of(sheet, layout, r, c).tobytes() == single.resize((w, h), Image.Resampling.NEAREST).tobytes()
    pictures = {Image.open(p).tobytes() for row in layout["images"] for p in row[:-1]}
    assert len(pictures) == 8  # every cell its own picture
    header = sheet.crop((x0, 0, x0 + w, y0)).convert("L")
    assert header.getextrema()[0] < 128  # a label is drawn
    caption = sheet.crop((x0, y0 + h, x0 + w, y0 + layout["row_step"])).convert("L")
    assert caption.getextrema()[0] < 128  # and a caption


def test_scores_and_difference_column_cell_for_cell(kohya, capsys):
    assert preview.main(kohya.args("--seeds", "1", "2", "--strengths", "0", "0.5", "1", "-0.5")) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    layout = grid.read_layout(kohya.out / "grid.png")
    document = json.loads((kohya.out / "scores.json").read_text(encoding="utf-8"))
    assert document["changed_delta_e"] == image_measures.CHANGED_DELTA_E
    rows = document["cells"]
    with open(kohya.out / "scores.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [{k: str(v) for k, v in row.items()} for row in rows] == table
    assert [(row["seed"], row["strength"]) for row in rows] == [(s, m) for s in (1, 2) for m in (0, 0.5, 1, -0.5)]
    for r, images in enumerate(layout["images"]):
        reference = image_measures.read_rgb(Path(images[0]))
        for c, path in enumerate(images[:-1]):
            row = rows[4 * r + c]
            measures, delta_e = image_measures.compare(reference, image_measures.read_rgb(Path(path)))
            assert row["image"] == path and row["lora"] == str(kohya.lora) and row["prompt"] == ""
            assert {k: row[k] for k in measures.as_dict()} == measures.as_dict()
            assert layout["captions"][r][c] == ("reference" if c == 0 else measures.headline)
            if row["strength"] == 1:  # the difference column: this cell's ΔE heatmap
                assert np.array_equal(image_measures.read_rgb(Path(images[-1])), image_measures.heatmap(delta_e))
                assert layout["captions"][r][-1] == f"changed {measures.changed_share:.0%}"
    by_strength = {m: [row for row in rows if row["strength"] == m] for m in (0, 0.5, 1, -0.5)}
    assert all(row["structure_kept"] == 1 and row["delta_e"] == 0 for row in by_strength[0])
    # the stand-in turns its picture grey at strength 1: structure nearly kept, chroma lost, in the coloured right half
    assert all(row["structure_kept"] > 0.9 and row["delta_chroma"] < -15 and 0.4 < row["changed_share"] <= 0.5
               for row in by_strength[1])
    for images in layout["images"]:
        heat = image_measures.read_rgb(Path(images[-1]))
        assert not heat[:, :8].any() and heat[:, 8:].any()
    assert all(row["delta_chroma"] > 0 for row in by_strength[-0.5])  # more colourful
    median = float(np.median([row["structure_kept"] for row in by_strength[1]]))
    assert f"strength 1: structure {median:.2f}, ΔE" in summary


def test_strength_0_is_always_made(kohya):
    assert preview.main(kohya.args("--seeds", "4", "--strengths", "1")) == 0
    assert [c["am"] for c in kohya.gen_runs()[0]["cells"]] == [0.0, 1.0]
    assert grid.read_layout(kohya.out / "grid.png")["columns"] == ["strength 0", "strength 1", "dE 1 vs 0"]


def test_strength_0_alone_has_nothing_to_measure(kohya, capsys):
    assert preview.main(kohya.args("--seeds", "4", "--strengths", "0")) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(": only strength 0 was made: nothing measured against it")
    assert grid.read_layout(kohya.out / "grid.png")["columns"] == ["strength 0"]  # no difference column


def test_a_lora_given_twice_is_refused(kohya, capsys):
    args = kohya.args()
    args[args.index("--lora"):args.index("--lora") + 2] = ["--loras", str(kohya.lora), str(kohya.lora)]
    assert preview.main(args) == 2
    assert "a file is given twice" in capsys.readouterr().err and kohya.gen_runs() == []


def test_sweep_of_two_loras_in_one_run(kohya, capsys):
    other = kohya.root / "rank16.safetensors"
    write_tiny_lora(other)
    args = kohya.args("--seeds", "1", "2", "--strengths", "0", "1")
    args[args.index("--lora"):args.index("--lora") + 2] = ["--loras", str(kohya.lora), str(other)]
    assert preview.main(args) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    (run,) = kohya.gen_runs()
    argv = run["argv"]
    assert argv[argv.index("--network_module"):argv.index("--W")] == [
        "--network_module", "networks.lora", "networks.lora", "--network_weights", str(kohya.lora), str(other),
        "--network_mul", "1", "1"]
    # strength 0 once per seed, shared by both LoRAs' rows
    assert [(c["seed"], c["am"]) for c in run["cells"]] == [(s, m) for s in (1, 2)
                                                            for m in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0])]
    layout = grid.read_layout(kohya.out / "grid.png")
    assert layout["rows"] == ["seed 1\n1: edit", "seed 1\n2: rank16", "seed 2\n1: edit", "seed 2\n2: rank16"]
    assert layout["images"][0][0] == layout["images"][1][0] == str(kohya.out / "images" / "p00_seed1_strength+0.png")
    assert layout["images"][1][1] == str(kohya.out / "images" / "p00_seed1_lora2_strength+1.png")
    rows = json.loads((kohya.out / "scores.json").read_text(encoding="utf-8"))["cells"]
    assert [(row["seed"], Path(row["lora"]).name, row["strength"]) for row in rows] == [
        (s, name, m) for s in (1, 2) for name in ("edit.safetensors", "rank16.safetensors") for m in (0, 1)]
    first, second = ([row for row in rows if row["strength"] == 1 and Path(row["lora"]).name == name]
                     for name in ("edit.safetensors", "rank16.safetensors"))
    # the stand-in's second network also shifts the picture: the numbers tell the two apart
    assert all(a["structure_kept"] > b["structure_kept"] + 0.3 for a, b in zip(first, second))
    assert "edit.safetensors strength 1: structure" in summary and "rank16.safetensors strength 1:" in summary


def test_empty_prompt_is_written_as_an_empty_attention_group(kohya):
    assert preview.main(kohya.args("--seeds", "3", "--strengths", "1")) == 0
    assert (kohya.out / "prompts.txt").read_text().splitlines()[-1] == "() --am 1 --d 3"
    assert kohya.gen_runs()[0]["cells"][0]["prompt"] == "()"


def test_prompts_file(kohya):
    prompts = kohya.root / "prompts.txt"
    prompts.write_text("# mine\n\na dog\n--n lowres\n", encoding="utf-8")
    assert preview.main(kohya.args("--prompts", str(prompts), "--seeds", "1", "--strengths", "1")) == 0
    cells = kohya.gen_runs()[0]["cells"]
    assert [(c["prompt"], c["options"]) for c in cells] == [("a dog", ["am 0"]), ("a dog", ["am 1"]),
                                                            ("()", ["n lowres", "am 0"]), ("()", ["n lowres", "am 1"])]
    assert grid.read_layout(kohya.out / "grid.png")["rows"] == ["seed 1\na dog", "seed 1\n(empty prompt)"]


@pytest.mark.parametrize("text, message", [
    ("a cat --am 0.5\n", "prompts.txt:1: --am is set by --strengths; remove it from the prompt"),
    ("ok\na cat --d 3\n", "prompts.txt:2: --d is set by --seeds; remove it from the prompt"),
    ("a cat --n\n", "prompts.txt:1: '--n' is not a gen_img prompt option"),
    ("# only a comment\n\n", "prompts.txt: no prompts in this file"),
])
def test_bad_prompts_file(kohya, capsys, text, message):
    prompts = kohya.root / "prompts.txt"
    prompts.write_text(text, encoding="utf-8")
    assert preview.main(kohya.args("--prompts", str(prompts))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and kohya.gen_runs() == []


def test_prompts_file_not_utf8(kohya, capsys):
    prompts = kohya.root / "prompts.txt"
    prompts.write_bytes("猫".encode("shift_jis"))
    assert preview.main(kohya.args("--prompts", str(prompts))) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("flag, owner", [("--W", "--width"), ("--outdir=x", "--out"), ("--n_iter", "one image per cell")])
def test_gen_img_args_that_would_break_the_grid_are_refused(kohya, capsys, flag, owner):
    assert preview.main(kohya.args("--", flag, "2")) == 2
    assert owner in capsys.readouterr().err and kohya.gen_runs() == []


def test_failing_gen_img_is_our_exit_code(kohya, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_GEN_EXIT", "3")
    assert preview.main(kohya.args()) == 3
    err = capfd.readouterr().err
    assert "python -m copylora.preview: error: kohya's gen_img.py exited with code 3" in err
    assert not (kohya.out / "grid.png").exists()


def test_missing_images_are_an_error(kohya, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_GEN_SKIP", "1")
    assert preview.main(kohya.args("--seeds", "1", "2")) == 2
    assert "wrote 5 image(s) for 6 prompt lines" in capsys.readouterr().err


def test_sdxl_uses_sdxl_gen_img_at_1024(kohya, capsys):
    args = kohya.args("--sdxl", "--dry-run")
    for flag in ("--width", "--height"):
        del args[args.index(flag):args.index(flag) + 2]
    assert preview.main(args) == 0
    assert f"{PYTHON} sdxl_gen_img.py --ckpt" in capsys.readouterr().out
    assert preview.main(args) == 0
    assert "--W 1024 --H 1024" in capsys.readouterr().out


def test_a_folder_not_made_by_preview_is_left_alone(kohya, capsys):
    (kohya.out / "images").mkdir(parents=True)
    (kohya.out / "images" / "mine.png").write_bytes(b"")
    assert preview.main(kohya.args("--seeds", "1", "--strengths", "1")) == 2
    assert "exists and was not made by copylora preview" in capsys.readouterr().err
    assert (kohya.out / "images" / "mine.png").exists()
