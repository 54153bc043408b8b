"""Write the LoRA module manifests of kohya's DiT-family networks (FLUX.1, SD3, Lumina, HunyuanImage, Anima).

Run with the Python of an sd-scripts venv (see tests/README.md), from anywhere:

    /work/kohya_env/venv/bin/python tests/data/kohya/make_family_manifests.py \
        --sd-scripts /work/kohya_env/sd-scripts --out tests/data/kohya/manifests

Each manifest lists the modules kohya's own `networks/lora_<family>.py` `create_network(1.0, 8, 1.0, ...)`
makes, in kohya's order (`text_encoder_loras + unet_loras`), with the `lora_down`/`lora_up` shapes at dim 8:
the same JSON layout as `sd15.json`. The model skeletons are built by kohya's own loaders and classes
on the meta device (no weights, no download); the only numbers given here are SD3's, whose depth and
sizes kohya reads from a checkpoint's tensor shapes (see `sd3_params`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
from typing import Any, Callable
from unittest import mock

import torch

DIM = 8
ORDER = (
    "kohya order = network.text_encoder_loras + network.unet_loras (create_modules order). "
    "Note safetensors files store keys sorted by name."
)


def flux_models() -> tuple[Any, list[Any], str]:
    from library import flux_models, flux_utils

    with torch.device("meta"):
        dit = flux_models.Flux(flux_models.configs[flux_utils.MODEL_NAME_DEV].params)
    with mock.patch.object(flux_utils, "load_safetensors", lambda *a, **k: {}):
        clip_l = flux_utils.load_clip_l("(none)", None, "cpu")
        t5xxl = flux_utils.load_t5xxl("(none)", None, "cpu")
    note = (
        "FLUX.1 dev (flux_models.configs['dev']: 19 double + 38 single blocks); text encoders "
        "[CLIP-L, T5-XXL] from flux_utils.load_clip_l/load_t5xxl; T5-XXL gets no modules by default (train_t5xxl)"
    )
    return dit, [clip_l, t5xxl], note


def sd3_params() -> Any:
    """kohya reads SD3's depth and sizes from a checkpoint (sd3_utils.analyze_state_dict_state); these are
    what it reads from SD3.5 Large (38 joint blocks, 64 channels per block, RMS q/k norm, no x-block attn2)."""
    from library import sd3_models

    depth = 38
    return sd3_models.SD3Params(
        patch_size=2,
        depth=depth,
        num_patches=192 * 192,
        pos_embed_max_size=192,
        adm_in_channels=2048,
        qk_norm="rms",
        x_block_self_attn_layers=[],
        context_embedder_in_features=4096,
        context_embedder_out_features=64 * depth,
        model_type="5-large",
    )


def sd3_models_() -> tuple[Any, list[Any], str]:
    from accelerate import init_empty_weights
    from library import flux_utils, sd3_models, sd3_utils

    with init_empty_weights():
        dit = sd3_models.create_sd3_mmdit(sd3_params(), "torch")
    with mock.patch.object(sd3_utils, "load_safetensors", lambda *a, **k: {}), mock.patch.object(
        flux_utils, "load_safetensors", lambda *a, **k: {}
    ):
        clip_l = sd3_utils.load_clip_l("(none)", None, "cpu")
        clip_g = sd3_utils.load_clip_g("(none)", None, "cpu")
        t5xxl = sd3_utils.load_t5xxl("(none)", None, "cpu")
    note = (
        "SD3.5 Large shapes (sd3_models.create_sd3_mmdit with the SD3Params kohya reads from that checkpoint); "
        "text encoders [CLIP-L, CLIP-G, T5-XXL] from sd3_utils.load_clip_l/load_clip_g/load_t5xxl; "
        "T5-XXL gets no modules by default (train_t5xxl)"
    )
    return dit, [clip_l, clip_g, t5xxl], note


def lumina_models() -> tuple[Any, list[Any], str]:
    from library import lumina_models, lumina_util

    with torch.device("meta"):
        dit = lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner()
    with mock.patch.object(lumina_util, "load_safetensors", lambda *a, **k: {}):
        gemma2 = lumina_util.load_gemma2("(none)", None, "cpu")
    note = "Lumina Image 2.0 (lumina_models.NextDiT_2B_GQA_patch2_Adaln_Refiner); text encoder Gemma2-2B from lumina_util.load_gemma2"
    return dit, [gemma2], note


def hunyuan_image_models() -> tuple[Any, list[Any], str]:
    from library import hunyuan_image_models

    dit = hunyuan_image_models.create_model("torch", False, None)
    note = "HunyuanImage-2.1 (hunyuan_image_models.create_model); kohya's network has DiT modules only"
    return dit, [None, None], note


def anima_models() -> tuple[Any, list[Any], str]:
    import transformers
    from library import anima_models, anima_utils

    built: dict[str, Any] = {}
    anima_class = anima_models.Anima

    def build(**config: Any) -> Any:
        built["dit"] = anima_class(**config)
        return built["dit"]

    # load_anima_model holds kohya's fixed Anima config: let it build the model, and hand it back its own
    # (meta) state dict instead of a checkpoint's.
    with mock.patch.object(anima_utils.anima_models, "Anima", build), mock.patch.object(
        anima_utils, "load_safetensors_with_lora_and_fp8", lambda **k: dict(built["dit"].state_dict())
    ):
        dit = anima_utils.load_anima_model("cpu", "(none)", "torch", False, "cpu", None)
    config_dir = os.path.join(os.path.dirname(os.path.dirname(anima_utils.__file__)), "configs", "qwen3_06b")
    with torch.device("meta"):
        qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config.from_pretrained(config_dir)).model
    note = "Anima (anima_utils.load_anima_model's fixed config); text encoder Qwen3-0.6B from sd-scripts' configs/qwen3_06b"
    return dit, [qwen3], note


FAMILIES: dict[str, tuple[str, Callable[[], tuple[Any, list[Any], str]]]] = {
    "flux1": ("networks.lora_flux", flux_models),
    "sd3": ("networks.lora_sd3", sd3_models_),
    "lumina": ("networks.lora_lumina", lumina_models),
    "hunyuan_image": ("networks.lora_hunyuan_image", hunyuan_image_models),
    "anima": ("networks.lora_anima", anima_models),
}


def kind_of(down: torch.Size) -> tuple[str, list[int] | None]:
    if len(down) == 2:
        return "linear", None
    kernel = list(down[2:])
    return ("conv1x1" if kernel == [1, 1] else "conv"), kernel


def manifest(variant: str, network_module: str, build: Callable[[], tuple[Any, list[Any], str]], commit: str) -> dict:
    import importlib

    dit, text_encoders, note = build()
    network = importlib.import_module(network_module).create_network(1.0, DIM, 1.0, None, text_encoders, dit)
    te, unet = list(network.text_encoder_loras), list(network.unet_loras)
    modules, shapes, prefixes = [], collections.Counter(), collections.Counter()
    for lora in te + unet:
        down, up = lora.lora_down.weight.shape, lora.lora_up.weight.shape
        modules.append({"name": lora.lora_name, "down": list(down), "up": list(up)})
        kind, kernel = kind_of(down)
        fan_in = down[1]
        shapes[(up[0], fan_in, tuple(kernel) if kernel else None, kind)] += 1
        prefixes[lora.lora_name.split("_")[0] + "_" + lora.lora_name.split("_")[1]] += 1
    alpha_dtypes = {str(lora.alpha.dtype) for lora in te + unet}
    return {
        "variant": variant,
        "source": f"kohya-ss/sd-scripts {commit} {network_module.replace('.', '/')}.py "
        f"create_network(1.0, network_dim={DIM}, network_alpha=1.0, ...): {note}",
        "order": ORDER,
        "count": len(modules),
        "count_text_encoder": len(te),
        "count_unet": len(unet),
        "count_by_prefix": dict(prefixes),
        "alpha_buffer_dtype_before_save": sorted(alpha_dtypes)[0] if len(alpha_dtypes) == 1 else sorted(alpha_dtypes),
        "distinct_shapes": [
            {"out": out, "in": fan_in, "kernel": list(kernel) if kernel else None, "kind": kind, "modules": n}
            for (out, fan_in, kernel, kind), n in shapes.most_common()
        ],
        "modules": modules,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd-scripts", required=True, help="an sd-scripts checkout (its venv runs this script)")
    parser.add_argument("--out", required=True, help="folder for <family>.json")
    parser.add_argument("--commit", default="48d368fa", help="the sd-scripts commit, recorded in each manifest")
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help=f"default: all of {list(FAMILIES)}")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.sd_scripts))
    os.makedirs(args.out, exist_ok=True)
    for variant in args.families:
        network_module, build = FAMILIES[variant]
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            data = manifest(variant, network_module, build, args.commit)
        path = os.path.join(args.out, f"{variant}.json")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        print(f"{path}: {data['count']} modules ({data['count_text_encoder']} text encoder, {data['count_unet']} DiT)")


if __name__ == "__main__":
    main()
