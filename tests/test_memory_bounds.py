"""Memory bounded by the data (issue 22): reading a LoRA costs its own bytes, not a float32 copy.

No timings here; peak RSS comes from the kernel's high-water mark of a fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from copylora.formats import lora_file
from copylora.formats.lora_file import is_finite

# A fresh process reads the file and prints its RSS high-water mark before and after, in MB.
READ = """
import json, resource, sys
from copylora.formats.lora_file import read_lora
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
read_lora(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before": before, "after": after}))
"""


def test_is_finite_finds_every_non_finite_value():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        values = torch.ones(4, 5, dtype=dtype)
        assert is_finite(values) and is_finite(values[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            for where in ((0, 0), (3, 4), (2, 1)):
                damaged = values.clone()
                damaged[where] = bad
                assert not is_finite(damaged), (dtype, bad, where)
    assert is_finite(torch.full((10,), 60000.0, dtype=torch.float16))  # near fp16's largest value
    assert is_finite(torch.full((10,), 3e38))


def test_reading_a_large_lora_costs_its_bytes_not_a_float32_copy(tmp_path: Path):
    """A 128 MB fp16 LoRA: the whole file is one run of fp16 values, whose float32 sum (the NaN/Inf
    check) was a 256 MB copy (FLUX.1 files: 600 MB of peak memory). The read may cost the file's
    bytes plus 64 MB."""
    values = 1 << 26
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(16, values // 32).half(),
               "lora_unet_x.lora_up.weight": torch.randn(values // 32, 16).half()}
    path = tmp_path / "big.safetensors"
    lora_file.write_lora(path, tensors, {})
    size_mb = path.stat().st_size / 2**20
    done = subprocess.run([sys.executable, "-c", READ, str(path)], check=True, capture_output=True, text=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["after"] - rss["before"] <= size_mb + 64, (rss, size_mb)


def test_reading_a_loha_costs_its_bytes_not_its_formed_pair(tmp_path: Path):
    """A LoHa's exact pair is r² wide: 64 modules of 2048 × 2048 at dim 16 store 16 MB and form
    268 MB of float32 factors. The reader checks them on the meta device and keeps their shapes; the
    engine forms them a batch at a time (copylora.engine.formed_batches)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for index in range(64):
        for factor in ("w1", "w2"):
            tensors[f"lora_unet_m{index}.hada_{factor}_a"] = (torch.randn(2048, 16, generator=gen) * 0.05).half()
            tensors[f"lora_unet_m{index}.hada_{factor}_b"] = (torch.randn(16, 2048, generator=gen) * 0.02).half()
    path = tmp_path / "loha.safetensors"
    lora_file.write_lora(path, tensors, {"ss_network_module": "networks.loha"})
    size_mb = path.stat().st_size / 2**20
    done = subprocess.run([sys.executable, "-c", READ, str(path)], check=True, capture_output=True, text=True)
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    assert rss["after"] - rss["before"] <= size_mb + 64, (rss, size_mb)

    module = lora_file.read_lora(path).modules["lora_unet_m3"]
    assert module.up.is_meta and module.down.is_meta and module.rank == 256
    up, down = module.factors()
    stored = {key.rpartition(".")[2]: tensor.float() for key, tensor in tensors.items() if key.startswith("lora_unet_m3.")}
    delta = (stored["hada_w1_a"] @ stored["hada_w1_b"]) * (stored["hada_w2_a"] @ stored["hada_w2_b"])
    torch.testing.assert_close(up @ down * module.scale, delta, rtol=1e-5, atol=1e-6)
