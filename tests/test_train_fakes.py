"""Helpers, not tests: a stand-in sd-scripts checkout and accelerate for the adapter's tests (no torch training, no network).

The fake train_network.py / sdxl_train_network.py build their parser from kohya's real parser dumps
(tests/data/kohya/*_args.json), so copylora's probe reads real option lists from them. Run, they act
like a strict kohya: refuse a config key that is not an option, log what they were given, and write
a small LoRA whose weights depend on the training images (so B - A is not zero).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import kohya_file

DUMPS = {"train_network.py": kohya_file("train_network_args.json"),
         "sdxl_train_network.py": kohya_file("sdxl_train_network_args.json")}

# kohya's parser, rebuilt from its dump: the first part of every stand-in script (plain text, not a template)
PARSER_FROM_DUMP = textwrap.dedent('''
    import argparse, json

    def parser_from_dump(path):
        parser = argparse.ArgumentParser()
        for o in json.load(open(path))["options"]:
            if o["action"] == "_HelpAction":
                continue
            kwargs = {"dest": o["dest"]}
            if o["action"] == "_StoreTrueAction":
                kwargs["action"] = "store_true"
            elif o["nargs"] is not None:
                kwargs["nargs"] = o["nargs"]
            if o["choices"] is not None:
                kwargs["choices"] = o["choices"]
            if o["type"] in ("int", "float"):
                kwargs["type"] = {"int": int, "float": float}[o["type"]]
            parser.add_argument(*o["flags"], **kwargs)
        return parser
''')

FAKE_SCRIPT = textwrap.dedent('''
    import hashlib, json, os, sys, tomllib
    from pathlib import Path

    DUMP = {dump!r}

    def setup_parser():
        # the probe must not put copylora's package folder on sys.path (its inspect.py would shadow the stdlib's)
        assert not any(os.path.isfile(os.path.join(p or ".", "_probe.py")) for p in sys.path), sys.path
        return parser_from_dump(DUMP)

    if __name__ == "__main__":
        args = setup_parser().parse_args()
        with open(args.config_file, "rb") as handle:
            config = tomllib.load(handle)
        known = set(vars(args))
        unknown = sorted(set(config) - known)
        data = Path(config["train_data_dir"])
        record = {{"script": os.path.basename(__file__), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "accelerate": json.loads(os.environ.get("FAKE_ACCELERATE_ARGS", "null")),
                  "config": config, "unknown": unknown,
                  "dataset": sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())}}
        with open(os.environ["FAKE_KOHYA_LOG"], "a") as log:
            log.write(json.dumps(record) + "\\n")
        if unknown:
            sys.exit("unknown keys " + ", ".join(unknown))
        if os.environ.get("FAKE_KOHYA_EXIT"):
            print("fake kohya: failing on purpose", file=sys.stderr)
            sys.exit(int(os.environ["FAKE_KOHYA_EXIT"]))
        if os.environ.get("FAKE_KOHYA_WRITE") == "nothing":
            sys.exit(0)
        import numpy as np  # not torch: it would cost a second per run
        from safetensors.numpy import save_file
        seed = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(data.rglob("*.png")))).digest()
        rng = np.random.default_rng(int.from_bytes(seed[:6], "big"))
        rank = config["network_dim"]
        tensors = {{}}
        for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
            tensors[name + ".lora_down.weight"] = rng.standard_normal((rank, 32), dtype=np.float32)
            tensors[name + ".lora_up.weight"] = rng.standard_normal((48, rank), dtype=np.float32)
            tensors[name + ".alpha"] = np.array(float(config["network_alpha"]), dtype=np.float32)
        if os.environ.get("FAKE_KOHYA_WRITE") == "not-a-lora":
            tensors = {{"model.weight": np.zeros(2, dtype=np.float32)}}
        out = Path(config["output_dir"]) / (config["output_name"] + ".safetensors")
        save_file(tensors, str(out), metadata={{"ss_network_dim": str(rank)}})
        print("fake kohya: saved", out)
''')

FAKE_LAUNCH = textwrap.dedent('''
    """Stands for `accelerate launch`: skips its options, runs the script as __main__."""
    import json, os, runpy, sys
    args = sys.argv[1:]
    start = next(i for i, arg in enumerate(args) if arg.endswith(".py"))
    os.environ["FAKE_ACCELERATE_ARGS"] = json.dumps(args[:start])
    sys.argv = args[start:]
    sys.path.insert(0, ".")
    runpy.run_path(args[start], run_name="__main__")
''')


def make_sd_scripts(root: Path) -> Path:
    """A checkout copylora.kohya.checkout.find_checkout accepts, with the two fake training scripts."""
    (root / "networks").mkdir(parents=True)
    (root / "library").mkdir()
    (root / "networks" / "lora.py").write_text("# fake\n")
    (root / "networks" / "svd_merge_lora.py").write_text("# fake\n")
    for script, dump in DUMPS.items():
        (root / script).write_text(PARSER_FROM_DUMP + FAKE_SCRIPT.format(dump=str(dump)))
    return root


def make_accelerate(root: Path) -> Path:
    package = root / "accelerate" / "commands"
    package.mkdir(parents=True)
    (root / "accelerate" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "launch.py").write_text(FAKE_LAUNCH)
    return root


def dump_with_cuda(script: str, cuda: bool, path: Path) -> Path:
    """kohya's real parser dump, plus the answer the probe gives about CUDA."""
    data = json.loads(DUMPS[script].read_text())
    data["cuda"] = cuda
    path.write_text(json.dumps(data))
    return path


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


PYTHON = sys.executable


def write_base_checkpoint(path: Path) -> Path:
    """A tiny checkpoint as the base: the fakes never read it, copylora checks that it is one."""
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    return path


def write_tiny_lora(path: Path) -> Path:
    """A one-module kohya LoRA: the stand-in gen_img never reads it, copylora checks that it is one."""
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1),
               "lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    return path


class FakeKohya:
    """A stand-in checkout, stand-in accelerate on PYTHONPATH, a run log and a base model, in tmp_path."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = tmp_path
        self.sd_scripts = make_sd_scripts(tmp_path / "sd-scripts")
        monkeypatch.setenv("PYTHONPATH", str(make_accelerate(tmp_path / "fake_site")))
        self.log = tmp_path / "kohya.log"
        monkeypatch.setenv("FAKE_KOHYA_LOG", str(self.log))
        for name in ("FAKE_KOHYA_EXIT", "FAKE_KOHYA_WRITE"):
            monkeypatch.delenv(name, raising=False)
        self.base = tmp_path / "base.safetensors"
        write_base_checkpoint(self.base)
