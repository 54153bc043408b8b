"""Bad input through the CLI: one-line error naming the file/module, exit 2, no output, inputs untouched."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.merge import main as merge_main

SMALL = [
    ModuleShape("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, (1, 1)),
    ModuleShape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 24),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 32, 16),
]


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors' own writer: it writes the NaN/Inf inputs that copylora's writer refuses to."""
    save_file(tensors, str(path), metadata or {"ss_network_dim": "4"})
    return path


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    return write(tmp_path / "A.safetensors", random_lora(SMALL, 4, 1.0, 0)), write(
        tmp_path / "B.safetensors", random_lora(SMALL, 4, 1.0, 1)
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def run_merge(capsys):
    """The CLI in-process (its main() returns the exit code); output captured like a terminal's."""

    def run(*args: str) -> Result:
        code = merge_main([*args, "--backend", "torch"])
        return Result(code, capsys.readouterr().err)

    return run


def assert_refused(result: Result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr  # one line (INFO lines may precede it)
    assert errors[0].startswith("python -m copylora.merge: error: ")
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def merge_args(models: list[Path], out: Path, *extra: str) -> list[str]:
    return ["--models", *map(str, models), "--ratios", *(["1"] * len(models)), "--save_to", str(out), *extra]


def check_case(run_merge, tmp_path: Path, models: list[Path], extra: list[str], needles: list[str]) -> None:
    out = tmp_path / "out.safetensors"
    before = {m: digest(m) for m in models if m.exists()}
    assert_refused(run_merge(*merge_args(models, out, *extra)), *needles)
    assert not out.exists()
    assert {m: digest(m) for m in before} == before
    assert not list(tmp_path.glob(".out.safetensors.*"))  # no temp file left behind


def test_missing_file(run_merge, tmp_path, pair):
    check_case(run_merge, tmp_path, [pair[0], tmp_path / "nope.safetensors"], [], ["nope.safetensors", "no such file"])


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(run_merge, tmp_path, pair):
    pair[1].chmod(0)
    check_case(run_merge, tmp_path, list(pair), [], [str(pair[1]), "not readable"])


def test_wrong_file_type(run_merge, tmp_path, pair):
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    check_case(run_merge, tmp_path, [pair[0], other], [], ["notes.txt", "unsupported file type"])


def test_corrupt_header(run_merge, tmp_path, pair):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{not json")
    check_case(run_merge, tmp_path, [pair[0], bad], [], ["bad.safetensors", "not a valid safetensors file"])


def test_truncated_file(run_merge, tmp_path, pair):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(pair[1].read_bytes()[:-100])
    check_case(run_merge, tmp_path, [pair[0], cut], [], ["cut.safetensors", "not a valid safetensors file"])


def test_checkpoint_is_not_a_lora(run_merge, tmp_path, pair):
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(ckpt))
    check_case(run_merge, tmp_path, [pair[0], ckpt], [], ["model.safetensors", "no lora_down/lora_up pairs"])


def test_embedding_is_not_a_lora(run_merge, tmp_path, pair):
    emb = tmp_path / "emb.pt"
    torch.save({"emb_params": torch.zeros(2, 768)}, emb)
    check_case(run_merge, tmp_path, [pair[0], emb], [], ["emb.pt", "not a LoRA"])


def test_pickle_with_code_is_refused(run_merge, tmp_path, pair):
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05echo\x94\x85\x94R\x94.")
    check_case(run_merge, tmp_path, [pair[0], evil], [], ["evil.ckpt", "refused"])


def test_shape_mismatch_names_module(run_merge, tmp_path, pair):
    tensors = random_lora(SMALL, 4, 1.0, 2)
    name = SMALL[1].name
    tensors[f"{name}.lora_down.weight"] = torch.randn(4, 40, dtype=torch.float16)
    other = write(tmp_path / "xl.safetensors", tensors)
    check_case(run_merge, tmp_path, [pair[0], other], [], ["xl.safetensors", name, "different base models"])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(run_merge, tmp_path, pair, value):
    tensors = random_lora(SMALL, 4, 1.0, 3)
    tensors[f"{SMALL[2].name}.lora_up.weight"][0, 0] = value
    bad = write(tmp_path / "nan.safetensors", tensors)
    check_case(run_merge, tmp_path, [pair[0], bad], [], ["nan.safetensors", SMALL[2].name, "NaN or Inf"])


def test_nan_outside_the_lora_modules_is_not_an_error(run_merge, tmp_path, pair):
    """The whole-file NaN check fails here; the per-module check it falls back to must pass."""
    tensors = random_lora(SMALL, 4, 1.0, 3)
    tensors["some_other_tensor"] = torch.tensor([1.0, float("nan")], dtype=torch.float16)
    odd = write(tmp_path / "odd.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    result = run_merge(*merge_args([pair[0], odd], out))
    assert result.returncode == 0, result.stderr
    assert out.exists()


@pytest.mark.parametrize(("fragment", "kind"), [("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA")])
def test_lycoris_and_dora_are_refused(run_merge, tmp_path, pair, fragment, kind):
    tensors = random_lora(SMALL, 4, 1.0, 4)
    tensors[f"{SMALL[0].name}.{fragment}"] = torch.zeros(4, 4, dtype=torch.float16)
    bad = write(tmp_path / "lyco.safetensors", tensors)
    check_case(run_merge, tmp_path, [pair[0], bad], [], ["lyco.safetensors", kind])


def test_ratio_count(run_merge, tmp_path, pair):
    out = tmp_path / "out.safetensors"
    assert_refused(run_merge("--models", *map(str, pair), "--ratios", "1", "--save_to", str(out)), "--ratios", "1 values for 2 models")
    assert not out.exists()


def test_lbws_count(run_merge, tmp_path, pair):
    check_case(run_merge, tmp_path, list(pair), ["--lbws", "[" + ",".join(["1"] * 17) + "]"], ["--lbws", "1 vectors for 2 models"])


def test_lbws_not_json(run_merge, tmp_path, pair):
    check_case(run_merge, tmp_path, list(pair), ["--lbws", "[1,1", "[1]"], ["--lbws", "not JSON"])


def test_lbws_wrong_length(run_merge, tmp_path, pair):
    five = "[1,1,1,1,1]"
    check_case(run_merge, tmp_path, list(pair), ["--lbws", five, five], ["--lbws", "has 5 values", "[12, 17, 20, 26]"])


@pytest.mark.parametrize("flag", ["--new_rank", "--new_conv_rank"])
def test_rank_below_one(run_merge, tmp_path, pair, flag):
    check_case(run_merge, tmp_path, list(pair), [flag, "0"], [flag, "at least 1"])


def test_save_to_is_an_input(run_merge, tmp_path, pair):
    before = digest(pair[0])
    result = run_merge(*merge_args(list(pair), pair[0]))
    assert_refused(result, str(pair[0]), "one of the input models")
    assert digest(pair[0]) == before


def test_save_to_missing_folder(run_merge, tmp_path, pair):
    out = tmp_path / "missing" / "out.safetensors"
    assert_refused(run_merge(*merge_args(list(pair), out)), "missing", "does not exist")
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "--device gpu: not a device; use cpu, cuda or cuda:N"), ("mps", "--device mps: copylora computes on cpu or cuda")],
)
def test_device_that_is_not_cpu_or_cuda(run_merge, tmp_path, pair, device, message):
    check_case(run_merge, tmp_path, list(pair), ["--device", device], [message])


def test_device_is_checked_before_any_file_is_read(run_merge, tmp_path):
    """--device gpu used to fail with a traceback after loading both inputs."""
    missing = [tmp_path / "B.safetensors", tmp_path / "A.safetensors"]
    assert_refused(run_merge(*merge_args(missing, tmp_path / "out.safetensors", "--device", "gpu")), "--device gpu")


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
def test_cuda_with_a_cpu_only_torch(run_merge, tmp_path, pair):
    needles = ["--device cuda", f"this torch ({torch.__version__}) is a CPU-only build; use --device cpu"]
    check_case(run_merge, tmp_path, list(pair), ["--device", "cuda"], needles)


def test_cuda_torch_that_sees_no_gpu(run_merge, tmp_path, pair, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    needles = ["--device cuda:0", "has CUDA but sees no GPU", "use --device cpu"]
    check_case(run_merge, tmp_path, list(pair), ["--device", "cuda:0"], needles)


def test_cuda_index_past_the_visible_gpus(run_merge, tmp_path, pair, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_case(run_merge, tmp_path, list(pair), ["--device", "cuda:1"], ["--device cuda:1: torch sees 1 GPU(s), cuda:0 to cuda:0"])


def test_exit_code_and_message_from_a_real_process(tmp_path, pair):
    """The same contract seen from a shell: exit status 2, the error on stderr, no traceback."""
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "copylora.merge", *merge_args([pair[0], tmp_path / "gone.safetensors"], out)],
        capture_output=True,
        text=True,
    )
    assert_refused(Result(result.returncode, result.stderr), "gone.safetensors", "no such file")
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_is_exact(dtype):
    """The fast check (a float32 sum) never passes NaN/Inf and never refuses finite values whose sum
    overflows (bf16 and float32 reach float32's range)."""
    from copylora.formats.lora_file import is_finite

    big = torch.finfo(dtype).max
    assert is_finite(torch.full((4, 3), big, dtype=dtype))  # finite, though the sum may overflow
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.ones(4, 3, dtype=dtype)
        values[2, 1] = bad
        assert not is_finite(values)
    inf_pair = torch.tensor([float("inf"), float("-inf")], dtype=dtype)  # sums to NaN, not to a finite value
    assert not is_finite(inf_pair)


# ---------------------------------------------------------------- issue 19's findings


@pytest.mark.parametrize("ratio", ["nan", "inf", "1e39"])
def test_a_ratio_no_merge_can_use_is_refused_while_parsing(run_merge, tmp_path, pair, ratio):
    """It used to reach the engine: "merge_group: a factor contains NaN or Inf" or LinAlgError."""
    out = tmp_path / "out.safetensors"
    result = run_merge("--models", *map(str, pair), "--ratios", "1", ratio, "--save_to", str(out))
    assert_refused(result, repr(ratio), "not a usable number")
    assert not out.exists()


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "1e39"])
def test_a_block_weight_no_merge_can_use_is_refused_while_parsing(run_merge, tmp_path, pair, weight):
    vector = "[" + ",".join(["1"] * 16 + [weight]) + "]"
    check_case(run_merge, tmp_path, list(pair), ["--lbws", vector, vector], ["--lbws", "finite number"])


def test_inspect_refuses_a_nan_ratio(tmp_path, pair, capsys):
    from copylora.inspect import main as inspect_main

    code = inspect_main([str(pair[0]), "--against", str(pair[1]), "--ratios", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not a usable number" in err, err


@pytest.mark.parametrize("seed", [3, 5, 12], ids=["KeyError", "UnicodeDecodeError", "IndexError"])
def test_random_bytes_as_a_checkpoint(run_merge, tmp_path, pair, seed):
    """4096 random bytes: torch.load fails with any error type (ids: what these seeds raise in it)."""
    bad = tmp_path / "noise.ckpt"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    bad.write_bytes(noise.numpy().tobytes())
    check_case(run_merge, tmp_path, [pair[0], bad], [], ["noise.ckpt", "not a readable torch checkpoint"])


def test_a_protocol_4_pickle_is_refused_in_one_line_with_the_reason(run_merge, tmp_path, pair):
    """torch printed two UserWarning lines first, and the refusal was cut before its point."""
    evil = tmp_path / "evil4.pt"
    evil.write_bytes(b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x05echo\x94\x85\x94R\x94.")
    out = tmp_path / "out.safetensors"
    result = run_merge(*merge_args([pair[0], evil], out), "--quiet")
    assert_refused(result, "evil4.pt", "refused", "arbitrary code")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_module_with_no_values_is_refused_by_name(run_merge, tmp_path, pair):
    """lora_down (4, 0) used to be written as a rank-0 module with alpha 0."""
    tensors = random_lora(SMALL, 4, 1.0, 5)
    name = SMALL[1].name
    tensors[f"{name}.lora_down.weight"] = torch.zeros(4, 0, dtype=torch.float16)
    bad = write(tmp_path / "empty.safetensors", tensors)
    check_case(run_merge, tmp_path, [bad], [], ["empty.safetensors", name, "no values"])


def test_a_file_name_with_a_newline_stays_one_line(run_merge, tmp_path, pair):
    odd = tmp_path / "two\nlines.safetensors"
    odd.write_bytes(b"\xff" * 8)
    out = tmp_path / "out.safetensors"
    result = run_merge(*merge_args([pair[0], odd], out), "--quiet")
    assert_refused(result, "two\\nlines.safetensors")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_takes_no_files_is_refused_before_the_work(run_merge, tmp_path, pair):
    result = run_merge(*merge_args(list(pair), Path("/proc/x.safetensors")), "--quiet")
    assert_refused(result, "/proc/x.safetensors", "cannot write in /proc")
    assert "merged" not in result.stderr


def test_an_alpha_past_fp16_is_refused_not_written_as_inf(run_merge, tmp_path):
    """alpha 3e38 and fp16: the merged lora_up used to be saved as Inf, exit 0."""
    tensors = random_lora(SMALL, 4, 1.0, 6)
    tensors[f"{SMALL[0].name}.alpha"] = torch.tensor(3e38)
    big = write(tmp_path / "big.safetensors", tensors)
    check_case(run_merge, tmp_path, [big], ["--save_precision", "fp16"],
               ["out.safetensors", SMALL[0].name, "NaN or Inf in float16", "--save_precision float"])


def test_large_ratios_past_fp16_are_refused(run_merge, tmp_path):
    tensors = {k: (v * 300 if v.dim() else v) for k, v in random_lora(SMALL, 4, 4.0, 7).items()}
    big = write(tmp_path / "big.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    result = run_merge("--models", str(big), str(big), "--ratios", "100", "100", "--save_to", str(out),
                       "--save_precision", "fp16")
    assert_refused(result, "out.safetensors", "NaN or Inf in float16")
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))


def test_resize_refuses_to_write_an_infinite_alpha(tmp_path, capsys):
    """alpha 3e38 of rank 4 resized to rank 8: alpha = 6e38 used to be written as inf."""
    from copylora.resize import main as resize_main

    tensors = random_lora(SMALL, 4, 1.0, 8)
    tensors[f"{SMALL[1].name}.alpha"] = torch.tensor(3e38)
    big = write(tmp_path / "big.safetensors", tensors)
    out = tmp_path / "small.safetensors"
    code = resize_main(["--model", str(big), "--new_rank", "8", "--save_to", str(out), "--backend", "torch", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{SMALL[1].name}.alpha would be saved as NaN or Inf" in err
    assert not out.exists() and not list(tmp_path.glob(".small.safetensors.*"))
