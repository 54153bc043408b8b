"""Fault injection for merge, resize and inspect: a corpus of corrupt files generated here
(safetensors header mutations and truncations, checkpoint zips cut or bit-flipped, pickles of
every protocol carrying code, LoRAs that are wrong inside) and real faults (a full disk, a
read-only folder, signals and kill -9 during the write, an input cut while the merge runs).

For every case: exit 2 (or 0), at most one line on stderr, no traceback, no file left behind,
inputs byte-identical, and an output only on exit 0, with nothing non-finite in it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from copylora.errors import CopyloraError
from copylora.formats.lora_file import read_lora
from copylora.formats.synthetic import ModuleShape, random_lora
from copylora.inspect import main as inspect_main
from copylora.merge import main as merge_main
from copylora.resize import main as resize_main
from tests.faults_common import assert_one_line_outcome, digests, full_disk, read_only_folder, temp_files

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    ModuleShape("lora_unet_down_blocks_0_attentions_0_proj_in", 16, 16, (1, 1)),
    ModuleShape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 16, 24),
    ModuleShape("lora_te_text_model_encoder_layers_0_mlp_fc1", 32, 16),
]
GOOD = random_lora(SMALL, 4, 1.0, 0)


# ---------------------------------------------------------------- the corpus


def with_header(raw: bytes, change: Callable[[dict], None]) -> bytes:
    end = 8 + int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:end])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[end:]


def noise(count: int, seed: int) -> bytes:
    return torch.randint(0, 256, (count,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy().tobytes()


def flipped(raw: bytes, seed: int, flips: int = 8) -> bytes:
    data = bytearray(raw)
    g = torch.Generator().manual_seed(seed)
    for position in torch.randint(0, len(data), (flips,), generator=g).tolist():
        data[position] ^= 0xFF
    return bytes(data)


class EvilReduce:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def corpus() -> dict[str, bytes]:
    """name (with its suffix) -> file contents; every one is broken in a way a user may meet."""
    raw = save(GOOD, metadata={"ss_network_dim": "4"})
    first = next(k for k in json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]) if k != "__metadata__")
    files = {
        "empty.safetensors": b"",
        "seven-bytes.safetensors": raw[:7],
        "header-cut.safetensors": raw[:40],
        "data-cut.safetensors": raw[:-100],
        "one-byte-short.safetensors": raw[:-1],
        "one-byte-long.safetensors": raw + b"\0",
        "huge-length.safetensors": (2**40).to_bytes(8, "little") + raw[8:],
        "zero-length.safetensors": bytes(8) + raw[8:],
        "not-json.safetensors": raw[:8] + b"{not json" + raw[17:],
        "not-utf8.safetensors": raw[:9] + b"\xff\xfe" + raw[11:],
        "header-a-list.safetensors": with_header(raw, lambda h: h.clear()).replace(b"{}", b"[]", 1),
        "unknown-dtype.safetensors": with_header(raw, lambda h: h[first].update(dtype="F4")),
        "shape-off.safetensors": with_header(raw, lambda h: h[first].update(shape=[3, 3])),
        "offsets-past-end.safetensors": with_header(raw, lambda h: h[first].update(data_offsets=[0, 10**9])),
        "metadata-not-strings.safetensors": with_header(raw, lambda h: h.update(__metadata__={"n": 1})),
        "noise.safetensors": noise(4096, 1),
        "flipped.safetensors": flipped(raw, 2),
    }
    zipped = _saved(dict(GOOD))
    files |= {
        "zip-cut.ckpt": zipped[: len(zipped) // 2],
        "zip-flipped.ckpt": flipped(zipped, 3, flips=32),
        "noise-keyerror.ckpt": noise(4096, 3),
        "noise-indexerror.pt": noise(4096, 12),
        "noise-unicode.pth": noise(4096, 5),
        "a-list.pt": pickle.dumps([1, 2, 3], protocol=2),
        "a-tensor.pt": _saved(torch.ones(3)),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        files[f"code-protocol-{protocol}.ckpt"] = pickle.dumps(EvilReduce(), protocol=protocol)
    lora = {
        "nan-up": {**GOOD, f"{SMALL[2].name}.lora_up.weight": torch.full((32, 4), float("nan"))},
        "zero-size": {**GOOD, f"{SMALL[1].name}.lora_down.weight": torch.zeros(4, 0)},
        "rank-mismatch": {**GOOD, f"{SMALL[1].name}.lora_up.weight": torch.ones(16, 3)},
        "alpha-3e38": {**GOOD, f"{SMALL[0].name}.alpha": torch.tensor(3e38)},
        "alpha-vector": {**GOOD, f"{SMALL[0].name}.alpha": torch.ones(2)},
        "int-factors": {**GOOD, f"{SMALL[1].name}.lora_down.weight": torch.ones(4, 24, dtype=torch.int32)},
        "up-without-down": {k: v for k, v in GOOD.items() if k != f"{SMALL[1].name}.lora_down.weight"},
        "no-lora-at-all": {"model.weight": torch.ones(4, 4)},
    }
    files |= {f"{name}.safetensors": save(tensors) for name, tensors in lora.items()}
    return files


def _saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


CORPUS = corpus()
# files a reader may take (they are LoRAs; only what is written from them can be wrong)
ACCEPTED = {"alpha-3e38.safetensors"}


def assert_finite_output(path: Path) -> None:
    tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    for key, tensor in tensors.items():
        assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()), key


def check(code: int, stderr: str, folder: Path, inputs: dict[Path, str], out: Path | None) -> None:
    """The promise, for one run: exit 0 or 2 and one line, nothing left behind, inputs untouched."""
    assert_one_line_outcome(code, "\n".join(l for l in stderr.splitlines() if not l.startswith("WARNING")))
    if code == 2:
        assert len(stderr.strip().splitlines()) == 1 and ": error: " in stderr, stderr
    assert not temp_files(folder)
    assert digests(list(inputs)) == inputs
    if out is not None:
        assert out.exists() == (code == 0), (code, stderr)
        if out.exists():
            assert_finite_output(out)
            out.unlink()


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    save_file(GOOD, str(path), metadata={"ss_network_dim": "4"})
    return path


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_corpus_through_merge_resize_and_inspect(tmp_path: Path, good: Path, capsys, name: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(CORPUS[name])
    inputs = digests([good, bad])
    out = tmp_path / "out.safetensors"
    runs = [
        (lambda precision=precision: merge_main(["--models", str(good), str(bad), "--ratios", "1", "1", "--save_to",
                                                 str(out), "--save_precision", precision, "--backend", "torch",
                                                 "--quiet"]), out)
        for precision in ("fp16", "float")
    ]
    runs.append((lambda: resize_main(["--model", str(bad), "--new_rank", "8", "--save_to", str(out),
                                      "--save_precision", "fp16", "--backend", "torch", "--quiet"]), out))
    runs.append((lambda: inspect_main([str(bad), "--backend", "torch"]), None))
    for run, output in runs:
        code = run()
        err = capsys.readouterr().err
        check(code, err, tmp_path, inputs, output)
        if name not in ACCEPTED:  # each file is broken for the reading itself: every command refuses it
            assert code == 2 and "error: " + str(bad) in err, err
        if name.startswith("code-"):
            assert "refused to load" in err and "arbitrary code" in err, err


# ---------------------------------------------------------------- faults of the machine


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, good: Path, capsys, suffix: str) -> None:
    """Disk full used to be OSError Errno 28, or for .ckpt torch's `enforce fail at inline_container.cc`."""
    with full_disk(tmp_path / "small") as folder:
        with open(folder / "filler", "wb", buffering=0) as filler:  # take every block there is
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        out = folder / f"out{suffix}"
        inputs = digests([good])
        code = merge_main(["--models", str(good), "--ratios", "1", "--save_to", str(out), "--backend", "torch",
                           "--quiet"])
        err = capsys.readouterr().err
        check(code, err, folder, inputs, out)
        assert code == 2 and "No space left on device" in err and str(out) in err


def test_a_read_only_output_folder_is_refused_before_the_work(tmp_path: Path, good: Path, capsys) -> None:
    with read_only_folder(tmp_path / "ro") as (folder, make_read_only):
        make_read_only()
        inputs = digests([good])
        for run in (
            lambda out: merge_main(["--models", str(good), "--ratios", "1", "--save_to", str(out), "--quiet"]),
            lambda out: resize_main(["--model", str(good), "--save_to", str(out), "--quiet"]),
        ):
            code = run(folder / "out.safetensors")
            err = capsys.readouterr().err
            check(code, err, folder, inputs, folder / "out.safetensors")
            assert code == 2 and f"cannot write in {folder}" in err


# A merge in a child process with a fault injected at one moment: the signal arrives from inside
# the write (at the temp file's fsync, or at the rename), or an input is cut before the engine runs.
DRIVER = """
import os, sys
signum, moment, cut = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if moment in ("fsync", "replace"):
    real = getattr(os, moment)
    def injected(*args):
        os.kill(os.getpid(), signum)
        return real(*args)
    setattr(os, moment, injected)
if moment == "cut":
    import copylora.pipelines.svd_merge as pipeline
    real_merge = pipeline.merge_jobs
    def cut_then_merge(*args, **kwargs):
        os.truncate(cut, 64)  # a trainer rewriting the input while the merge runs
        return real_merge(*args, **kwargs)
    pipeline.merge_jobs = cut_then_merge
from copylora.merge import main
sys.exit(main(sys.argv[4:]))
"""


def run_driver(signum: int, moment: str, cut: Path | str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, str(signum), moment, str(cut), *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)


# each case is a process start (seconds on a loaded machine): the signals that would otherwise
# kill the process (SIGTERM at both moments, SIGHUP) and Ctrl-C's, which always cleaned up
SIGNAL_CASES = [("SIGTERM", "fsync"), ("SIGTERM", "replace"), ("SIGHUP", "fsync"), ("SIGINT", "fsync")]


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(("signame", "moment"), SIGNAL_CASES, ids=[f"{s}-at-{m}" for s, m in SIGNAL_CASES])
def test_a_signal_during_the_write_leaves_nothing(tmp_path: Path, good: Path, signame: str, moment: str) -> None:
    """SIGTERM/SIGHUP used to leave .NAME.<random>.tmp beside the output forever; SIGINT did not."""
    signum = getattr(signal, signame)
    out = tmp_path / "out.safetensors"
    inputs = digests([good])
    # --backend torch: without the extension (a bare clone), auto's fallback warning would be a second line
    proc = run_driver(signum, moment, "-", ["--models", str(good), "--ratios", "1", "--save_to", str(out), "--quiet",
                                            "--backend", "torch"])
    expected = 130 if signame == "SIGINT" else 128 + signum
    assert proc.returncode == expected, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 1, proc.stderr
    assert not out.exists() and not temp_files(tmp_path) and digests([good]) == inputs


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_kill_9_during_the_write_is_cleaned_up_by_the_next_run(tmp_path: Path, good: Path, capsys) -> None:
    """kill -9 left its temp file (up to 151 MB) forever; the next write to the same target removes it."""
    out = tmp_path / "out.safetensors"
    args = ["--models", str(good), "--ratios", "1", "--save_to", str(out), "--quiet"]
    proc = run_driver(signal.SIGKILL, "fsync", "-", args)
    assert proc.returncode == -signal.SIGKILL
    assert len(temp_files(tmp_path)) == 1 and not out.exists()  # what kill -9 leaves; nothing can stop that
    assert merge_main([*args, "--backend", "torch"]) == 0, capsys.readouterr().err
    assert not temp_files(tmp_path) and out.exists()


def test_an_input_cut_while_the_merge_runs(tmp_path: Path, good: Path) -> None:
    """The inputs stayed memory-mapped: a file truncated under the merge killed it with SIGBUS."""
    other = tmp_path / "other.safetensors"  # many pages, so cutting it leaves pages past its end
    save_file(random_lora([ModuleShape("lora_unet_mid_block_attentions_0_proj_in", 640, 640)], 32, 1.0, 1), str(other))
    out = tmp_path / "out.safetensors"
    proc = run_driver(0, "cut", other, ["--models", str(good), str(other), "--ratios", "1", "-1", "--save_to",
                                          str(out), "--quiet"])
    assert_one_line_outcome(proc.returncode, proc.stderr)
    assert proc.returncode == 0 and out.exists() and not temp_files(tmp_path)  # it read the inputs before


# ---------------------------------------------------------------- fuzzing the readers


@st.composite
def fuzzed_files(draw) -> tuple[str, bytes]:
    """A valid LoRA as .safetensors or as a torch.save zip, with bytes flipped, cut or inserted."""
    suffix = draw(st.sampled_from([".safetensors", ".ckpt"]))
    data = bytearray(SAFETENSORS_BYTES if suffix == ".safetensors" else CHECKPOINT_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        if not data:
            break
    return suffix, bytes(data)


SAFETENSORS_BYTES = save(GOOD, metadata={"ss_network_dim": "4"})
CHECKPOINT_BYTES = _saved(dict(GOOD))


@settings(max_examples=150, deadline=None)
@given(case=fuzzed_files())
def test_a_fuzzed_file_is_read_or_refused_in_one_line(case: tuple[str, bytes]) -> None:
    """What a fuzzer found before (17 of 1,050 checkpoints raised KeyError, IndexError...): reading a
    damaged file either gives a LoRA or one CopyloraError naming it; never another exception."""
    suffix, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(data)
        try:
            read_lora(path)
        except CopyloraError as exc:
            assert str(path) in str(exc) and "\n" not in str(exc)
