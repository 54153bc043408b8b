"""Helpers, not tests: stand-ins for kohya's networks/merge_lora.py (+ SDXL) and gen_img.py (+ SDXL).

Like the stand-in training scripts (test_train_fakes.py), each builds its parser from kohya's real
argparse dump, so an option copylora emits that kohya lacks fails here too. The merge script
writes a small "checkpoint" whose bytes depend on the base and the LoRA; the generator reads the
prompts file the way gen_img.py does (blank and # lines skipped, `--d SEED`, `--am M1,M2,…`, the rest
cut at " --") and writes one PNG per line, sequentially named, with gen_img's "seed" PNG text.
Its picture has known answers for copylora's measures: 4 x 4-pixel blocks drawn from the prompt and
seed, grey on the left half and coloured on the right; network 1 at multiplier M moves each pixel M
of the way to its grey (M = 1: its Rec. 601 greyscale, nearly the same structure; M < 0: more
colourful), and network 2 does the same and also shifts the picture right by 4M pixels (a
composition change). Every run is logged to $FAKE_KOHYA_LOG.
"""

from __future__ import annotations

from pathlib import Path

from tests.conftest import kohya_file
from tests.test_train_fakes import PARSER_FROM_DUMP

PARSER = PARSER_FROM_DUMP + '''
import hashlib, os, re, sys
from pathlib import Path

def setup_parser():
    return parser_from_dump(__DUMP__)

def log(record):
    record.update(script=os.path.basename(__file__), argv=sys.argv[1:], cwd=os.getcwd())
    with open(os.environ["FAKE_KOHYA_LOG"], "a") as handle:
        handle.write(json.dumps(record) + "\\n")
'''

FAKE_MERGE = PARSER + '''
if __name__ == "__main__":
    args = setup_parser().parse_args()
    log({"sd_model": args.sd_model, "models": args.models, "ratios": args.ratios, "save_to": args.save_to,
         "save_precision": args.save_precision})
    if os.environ.get("FAKE_BAKE_EXIT"):
        sys.exit(int(os.environ["FAKE_BAKE_EXIT"]))
    digest = hashlib.sha256(Path(args.sd_model).read_bytes())
    for model in args.models:
        digest.update(Path(model).read_bytes())
    Path(args.save_to).write_bytes(b"fake merged checkpoint " + digest.hexdigest().encode())
    print("fake kohya: saved", args.save_to)
'''

FAKE_GEN = PARSER + '''
if __name__ == "__main__":
    args = setup_parser().parse_args()
    lines = [d for d in open(args.from_file, encoding="utf-8").read().splitlines() if d.strip() and d[0] != "#"]
    cells = []
    for raw in lines:
        m = re.search(r" --d ([\\d+,]+)", raw)
        seed = int(m.group(1)) if m else 0
        raw = raw[: m.start()] + raw[m.end():] if m else raw
        parts = raw.strip().split(" --")
        am = args.network_mul[0]
        for part in parts[1:]:
            n = re.match(r"am ([\\d\\.\\-,]+)", part)
            if n:
                values = [float(v) for v in n.group(1).split(",")]
                am = values[0] if len(values) == 1 else values
        cells.append({"prompt": parts[0], "options": parts[1:], "seed": seed, "am": am})
    log({"cells": cells, "outdir": args.outdir, "W": args.W, "H": args.H, "steps": args.steps})
    if os.environ.get("FAKE_GEN_EXIT"):
        print("fake gen_img: failing on purpose", file=sys.stderr)
        sys.exit(int(os.environ["FAKE_GEN_EXIT"]))
    import numpy as np
    from PIL import Image, PngImagePlugin
    os.makedirs(args.outdir, exist_ok=True)
    for i, cell in enumerate(cells[: len(cells) - int(os.environ.get("FAKE_GEN_SKIP", "0"))]):
        scene = [cell["prompt"], [o for o in cell["options"] if not o.startswith("am ")], cell["seed"]]
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(json.dumps(scene).encode()).digest()[:8], "big"))
        picture = rng.integers(0, 256, (-(-args.H // 4), -(-args.W // 4), 3)).astype(float)
        picture = picture.repeat(4, axis=0).repeat(4, axis=1)[: args.H, : args.W]
        picture[:, : args.W // 2] = picture[:, : args.W // 2].mean(axis=-1, keepdims=True)
        muls = cell["am"] if isinstance(cell["am"], list) else [cell["am"]]
        for network, mul in enumerate(muls[:2]):
            grey = picture @ [0.299, 0.587, 0.114]
            picture = picture + mul * (grey[..., None] - picture)
            if network == 1:
                picture = np.roll(picture, round(4 * mul), axis=1)
        info = PngImagePlugin.PngInfo()
        info.add_text("seed", str(cell["seed"]))
        Image.fromarray(np.clip(picture, 0, 255).round().astype(np.uint8), "RGB").save(
            os.path.join(args.outdir, f"im_{i + 1:06d}.png"), pnginfo=info)
'''

TOOLS = {
    "networks/merge_lora.py": (FAKE_MERGE, "merge_lora_args.json"),
    "networks/sdxl_merge_lora.py": (FAKE_MERGE, "sdxl_merge_lora_args.json"),
    "gen_img.py": (FAKE_GEN, "gen_img_args.json"),
    "sdxl_gen_img.py": (FAKE_GEN, "sdxl_gen_img_args.json"),
}


def add_tools(sd_scripts: Path) -> Path:
    """Put the stand-in merge and generation scripts into a stand-in checkout."""
    for relative, (source, dump) in TOOLS.items():
        (sd_scripts / relative).write_text(source.replace("__DUMP__", repr(str(kohya_file(dump)))))
    return sd_scripts
