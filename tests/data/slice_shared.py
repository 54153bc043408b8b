"""Regenerates tests/data/ from ../shared: the compact reference data a bare clone tests against.

    python tests/data/slice_shared.py [--shared ../shared] [--out tests/data]

Stock merges (and resizes) each module on its own, so the same module names cut out of the inputs
and out of stock's outputs are still a valid golden case. Files are cut byte for byte: the kept
tensors' bytes, the header entries in the source's order and the metadata exactly as stock wrote
them. Output is deterministic; sources.json records what each file was made from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Byte-identical copies: kohya's option dumps (one per script) and the module manifests the tests
# and benchmarks use (the *_conv ones, with LoCon's conv modules, only the benchmarks).
COPIED = [
    *(f"kohya/{script}_args.json" for script in (
        "svd_merge_lora", "resize_lora", "merge_lora", "sdxl_merge_lora",
        "train_network", "sdxl_train_network", "gen_img", "sdxl_gen_img")),
    "kohya/manifests/sd15.json",
    "kohya/manifests/sdxl.json",
    "kohya/manifests/sd15_conv.json",
    "kohya/manifests/sdxl_conv.json",
    # the SDXL subset is small enough to keep whole: its files carry stock's whole-file facts
    # (sshs_* hashes, modelspec.*), which no cut file can
    "golden/sdxl_subset/cases.json",
    "golden/sdxl_subset/A.safetensors",
    "golden/sdxl_subset/B.safetensors",
    "golden/sdxl_subset/stock_r16.safetensors",
    "golden-resize/sdxl_subset/cases.json",
    "golden-resize/sdxl_subset/stock_resize_sdxl_ratio4.safetensors",
    "golden/real_sd15/cases.json",
    "golden-resize/real_sd15/cases.json",
    "golden/synth_sd15_conv/cases.json",
    "golden-resize/synth_sd15_conv/cases.json",
]

_BLOCK0 = "lora_unet_down_blocks_0_attentions_0"
_BLOCK0_TF = f"{_BLOCK0}_transformer_blocks_0"

# The real SD1.5 pair: both all-zero modules, text encoder, 1x1 conv (proj_in/out), self- and
# cross-attention and feed-forward shapes, one module from each of down/mid/up.
REAL_SD15_MODULES = [
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_11_mlp_fc1",
    "lora_te_text_model_encoder_layers_11_mlp_fc2",
    f"{_BLOCK0}_proj_in",
    f"{_BLOCK0}_proj_out",
    f"{_BLOCK0_TF}_attn1_to_q",
    f"{_BLOCK0_TF}_attn1_to_v",
    f"{_BLOCK0_TF}_attn2_to_k",
    f"{_BLOCK0_TF}_attn2_to_out_0",
    f"{_BLOCK0_TF}_ff_net_0_proj",
    f"{_BLOCK0_TF}_ff_net_2",
    "lora_unet_down_blocks_1_attentions_0_proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",  # all-zero lora_up
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k",  # all-zero lora_up
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",  # the file's last module
]

# The LoCon case: 3x3 convs (resnet, downsampler), 1x1 convs (proj_in, conv_shortcut), linears.
CONV_MODULES = [
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    f"{_BLOCK0}_proj_in",
    f"{_BLOCK0_TF}_attn1_to_q",
    f"{_BLOCK0_TF}_ff_net_2",
    "lora_unet_up_blocks_3_resnets_0_conv_shortcut",
    "lora_unet_up_blocks_3_resnets_2_time_emb_proj",  # the file's last module
]

SLICED = {
    "golden/real_sd15/A.safetensors": REAL_SD15_MODULES,
    "golden/real_sd15/B.safetensors": REAL_SD15_MODULES,
    "golden/real_sd15/stock_r16.safetensors": REAL_SD15_MODULES,
    "golden/real_sd15/stock_r8.safetensors": REAL_SD15_MODULES,
    "golden-resize/real_sd15/stock_resize_A_r4.safetensors": REAL_SD15_MODULES,
    "golden-resize/real_sd15/stock_resize_r16_fro09.safetensors": REAL_SD15_MODULES,
    "golden/synth_sd15_conv/A.safetensors": CONV_MODULES,
    "golden/synth_sd15_conv/B.safetensors": CONV_MODULES,
    "golden/synth_sd15_conv/stock_r16_c8.safetensors": CONV_MODULES,
    "golden-resize/synth_sd15_conv/stock_resize_conv_r4_c2.safetensors": CONV_MODULES,
}


def read_header(raw: bytes) -> tuple[dict, int]:
    """The safetensors JSON header (in file order) and where the data section starts."""
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), 8 + length


def slice_safetensors(raw: bytes, modules: list[str]) -> bytes:
    """The file with only these modules' tensors; metadata and bytes exactly as they were."""
    header, data_start = read_header(raw)
    kept = {key: entry for key, entry in header.items() if key.split(".")[0] in modules}
    missing = set(modules) - {key.split(".")[0] for key in kept}
    if missing:
        raise SystemExit(f"modules not in the source file: {sorted(missing)}")
    # resize_lora.py writes the alpha of the last module it resized as ss_network_alpha: a cut
    # file keeps the source's last module, so stock's value stays right for it
    last = max(key.split(".")[0] for key in header if key != "__metadata__")
    if last not in modules:
        raise SystemExit(f"the cut must keep the file's last module, {last}")
    out_header, chunks, offset = {}, [], 0
    if "__metadata__" in header:
        out_header["__metadata__"] = header["__metadata__"]
    for key, entry in sorted(kept.items(), key=lambda item: item[1]["data_offsets"][0]):  # source's data order
        begin, end = entry["data_offsets"]
        chunks.append(raw[data_start + begin : data_start + end])
        out_header[key] = {**entry, "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    ordered = {key: out_header[key] for key in header if key in out_header}  # source's header order
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # like safetensors: the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(shared: Path, out: Path) -> dict:
    """Writes every vendored file under out; returns the sources record."""
    files = {}
    for name in [*COPIED, *SLICED]:
        raw = (shared / name).read_bytes()
        modules = SLICED.get(name)
        data = raw if modules is None else slice_safetensors(raw, modules)
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        files[name] = {"source": f"../shared/{name}", "source_sha256": sha256(raw), "sha256": sha256(data),
                       "modules": modules}  # None: a whole, byte-identical copy
    record = {"made_by": "tests/data/slice_shared.py", "files": dict(sorted(files.items()))}
    (out / "sources.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent.parent / "shared")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    for stale in ("kohya", "golden", "golden-resize"):
        shutil.rmtree(args.out / stale, ignore_errors=True)
    record = build(args.shared, args.out)
    total = sum((args.out / name).stat().st_size for name in record["files"])
    print(f"{len(record['files'])} files, {total / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
