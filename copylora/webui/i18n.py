"""Every label, hint and message of the page, in English and Japanese."""

from __future__ import annotations

import locale
import os

LANGUAGES = ("en", "ja")

# key -> (English, Japanese)
TEXTS: dict[str, tuple[str, str]] = {
    "title": ("copylora: copy-machine LoRA", "copylora: コピー機LoRA"),
    "intro": (
        "Train LoRA A on the image before and LoRA B on the image after, then keep only the change (B − A). "
        "Every tab runs the same code as its `copylora` command.",
        "変更前の画像でLoRA A、変更後の画像でLoRA Bを学習し、その差分（B − A）だけを残します。"
        "各タブは対応する `copylora` コマンドと同じ処理を実行します。",
    ),
    # tabs
    "tab_copy_machine": ("Copy machine", "コピー機"),
    "tab_merge": ("Difference / merge", "差分 / マージ"),
    "tab_resize": ("Resize", "リサイズ"),
    "tab_inspect": ("Inspect", "検査"),
    "tab_preview": ("Preview", "プレビュー"),
    "tab_settings": ("Settings", "設定"),
    # shared fields
    "save_to": ("Output file (save_to)", "出力ファイル (save_to)"),
    "save_to_info": (
        "a file name goes into the output folder (Settings); .safetensors",
        "ファイル名だけなら出力フォルダ（設定）に保存します。拡張子は .safetensors",
    ),
    "new_rank": ("New rank (new_rank)", "新しいランク (new_rank)"),
    "new_conv_rank": ("Conv rank (new_conv_rank; 0 = same as new rank)", "Convランク (new_conv_rank、0 = 新しいランクと同じ)"),
    "save_precision": ("Save precision (save_precision)", "保存精度 (save_precision)"),
    "same_as_precision": ("same as the merge precision", "マージ時の精度と同じ"),
    "precision": ("Merge precision (precision)", "マージ時の精度 (precision)"),
    "clamp_quantile": ("Clamp quantile (clamp_quantile)", "クランプ分位点 (clamp_quantile)"),
    "clamp_info": (
        "1 = exact difference (no clamp); 0.99 = stock svd_merge_lora.py's clamp",
        "1 = 正確な差分（クランプなし）、0.99 = 本家 svd_merge_lora.py と同じクランプ",
    ),
    "dynamic_method": ("Dynamic rank (dynamic_method)", "ダイナミックランク (dynamic_method)"),
    "dynamic_method_info": (
        "choose each module's rank from its singular values; the rank above becomes the maximum",
        "各モジュールのランクを特異値から決めます。上のランクは上限になります",
    ),
    "dynamic_param": ("Target (dynamic_param)", "目標値 (dynamic_param)"),
    "device": ("Device (device)", "デバイス (device)"),
    "backend": ("Engine (backend)", "エンジン (backend)"),
    "backend_info": (
        "auto = the C++/CUDA extension when it is built, else pure torch",
        "auto = C++/CUDA 拡張がビルドされていればそれ、なければ pure torch",
    ),
    "lbws": ("Block weights (lbws)", "ブロック別の重み (lbws)"),
    "lbws_info": (
        "one JSON list per file, separated by spaces, e.g. [1,1,0,...]; empty = none",
        "ファイルごとに JSON のリストを1つ、空白区切り（例 [1,1,0,...]）。空欄 = なし",
    ),
    "split_sv": ("sqrt(S) on both up and down (split_sv)", "sqrt(S) を up と down の両方に (split_sv)"),
    "per_module_alpha": ("alpha = rank per module (per_module_alpha)", "モジュールごとに alpha = ランク (per_module_alpha)"),
    "inspect_clamp_info": (
        "0 = read off the file",
        "0 = ファイルから読み取る",
    ),
    "summary": ("Summary", "結果"),
    "fidelity": ("Fidelity against the exact weighted sum", "正確な重み付き和との比較"),
    "block_table": ("Per block", "ブロックごと"),
    "per_module": ("Per module", "モジュールごと"),
    "spectrum": ("Singular-value spectra", "特異値スペクトル"),
    "download": ("Download", "ダウンロード"),
    # merge tab
    "merge_intro": (
        "Any number of LoRA files, one ratio each (negative allowed, no rescaling): B − A is `1 -1`.",
        "LoRAファイルをいくつでも、それぞれに比率を一つ（負の値も可、合計を1に揃えることはしません）。B − A なら `1 -1`。",
    ),
    "models": ("LoRA files (models)", "LoRAファイル (models)"),
    "ratios": ("Ratios, one per file, in order (ratios)", "比率、ファイルの順に一つずつ (ratios)"),
    "ratios_info": ("e.g. 1 -1 for B − A; each from -2 to 2 is usual", "例: B − A なら 1 -1。通常は -2 〜 2"),
    "merge_button": ("Merge", "マージ"),
    # resize tab
    "model": ("LoRA file (model)", "LoRAファイル (model)"),
    "uniform_alpha": ("One alpha for all modules (uniform_alpha)", "全モジュールで同じ alpha (uniform_alpha)"),
    "uniform_alpha_info": (
        "each module's factor folded into lora_up: the same deltas, and dynamic-rank files load right in diffusers",
        "各モジュールの係数を lora_up に含めます。差分は同じで、ダイナミックランクのファイルも diffusers で正しく読めます",
    ),
    "resize_button": ("Resize", "リサイズ"),
    # inspect tab
    "lora": ("LoRA to inspect (lora)", "検査するLoRA (lora)"),
    "against": ("The files it was merged from (against; optional)", "マージ元のファイル (against、任意)"),
    "inspect_ratios": ("Their ratios (ratios)", "その比率 (ratios)"),
    "inspect_button": ("Inspect", "検査"),
    # preview tab
    "base": ("Base model (base)", "ベースモデル (base)"),
    "base_info": ("path of the .safetensors/.ckpt file or diffusers folder", ".safetensors/.ckpt ファイルまたは diffusers フォルダのパス"),
    "preview_lora": ("LoRA (lora)", "LoRA (lora)"),
    "strengths": ("Strengths (strengths)", "強度 (strengths)"),
    "seeds": ("Seeds (seeds)", "シード (seeds)"),
    "prompt": ("Prompts (prompt; empty = the LoRA alone)", "プロンプト (prompt、空欄 = LoRAのみ)"),
    "width": ("Width (width; 0 = 512, SDXL 1024)", "幅 (width、0 = 512、SDXL は 1024)"),
    "height": ("Height (height; 0 = 512, SDXL 1024)", "高さ (height、0 = 512、SDXL は 1024)"),
    "prompt_info": ("one per line, each a row of the grid per seed", "1行に1つ。シードごとにグリッドの行になります"),
    "steps": ("Sampling steps (steps)", "サンプリングステップ数 (steps)"),
    "sdxl": ("SDXL (sdxl)", "SDXL (sdxl)"),
    "gen_img_args": ("More gen_img.py options (gen_img_args)", "gen_img.py への追加オプション (gen_img_args)"),
    "preview_button": ("Make the grid", "グリッドを作成"),
    "grid": ("Preview grid", "プレビューグリッド"),
    # copy machine tab
    "cm_intro": (
        "The whole copy-machine recipe: kohya trains LoRA A on the image before and LoRA B on the image after "
        "(same preset and seed), then copylora writes B − A. Run again after a Stop or a change: what is unchanged "
        "is reused.",
        "コピー機LoRAの手順をまとめて実行します: kohya が変更前の画像でLoRA A、変更後の画像でLoRA Bを"
        "（同じプリセットとシードで）学習し、copylora が B − A を書き出します。停止や変更のあとにもう一度実行すると、"
        "変わっていない部分は再利用されます。",
    ),
    "before": ("Image before (before)", "変更前の画像 (before)"),
    "after": ("Image after (after)", "変更後の画像 (after)"),
    "method": ("Method (method)", "方式 (method)"),
    "method_info": (
        "subtract: train A and B on the base, write B − A; merged-base: bake A into the base, train B on it",
        "subtract: ベースでAとBを学習して B − A を出力、merged-base: Aをベースに焼き込み、その上でBを学習",
    ),
    "preset": ("Preset (preset)", "プリセット (preset)"),
    "preset_default": ("default for the model", "モデルに合わせた既定"),
    "max_train_epochs": ("Epochs (max_train_epochs; 0 = preset's)", "エポック数 (max_train_epochs、0 = プリセットの値)"),
    "max_train_steps": ("Steps (max_train_steps; 0 = preset's)", "ステップ数 (max_train_steps、0 = プリセットの値)"),
    "network_dim": ("LoRA dim (network_dim; 0 = preset's)", "LoRAの次元 (network_dim、0 = プリセットの値)"),
    "learning_rate": ("Learning rate (learning_rate; 0 = preset's)", "学習率 (learning_rate、0 = プリセットの値)"),
    "resolution": ("Resolution (resolution; empty = preset's)", "解像度 (resolution、空欄 = プリセットの値)"),
    "output": ("Output file (output)", "出力ファイル (output)"),
    "with_preview": ("Preview grid at the end (preview)", "最後にプレビューグリッドを作成 (preview)"),
    "preview_args": ("Preview options (preview_args)", "プレビューのオプション (preview_args)"),
    "work_dir": ("Work folder (work_dir)", "作業フォルダ (work_dir)"),
    "work_dir_info": (
        "LoRA A and B, their configs and datasets; a bare name goes into the output folder; empty: OUTPUT_work "
        "beside the output",
        "LoRA A・B、設定、データセットの置き場所。名前だけなら出力フォルダ内、空欄なら出力の隣（出力名_work）",
    ),
    "bake_precision": ("Merged checkpoint precision (bake_precision)", "統合チェックポイントの精度 (bake_precision)"),
    "delete_merged_base": (
        "Delete the merged checkpoint once B is trained (delete_merged_base)",
        "B の学習後に統合チェックポイントを削除 (delete_merged_base)",
    ),
    "run": ("Run", "実行"),
    "stop": ("Stop", "停止"),
    "log": ("The run's last lines (kohya's and copylora's)", "実行ログの最新行（kohya と copylora）"),
    "report": ("Report", "レポート"),
    "picture": ("Picture", "画像"),
    "step": ("step", "ステップ"),
    "kohya_steps": ("kohya", "kohya"),
    "elapsed": ("elapsed", "経過"),
    "remaining": ("remaining (this training, kohya's estimate)", "残り（この学習、kohya の見積もり）"),
    "step_train_a": ("train A", "A を学習"),
    "step_reuse_a": ("A reused", "A を再利用"),
    "step_bake": ("bake A into the base", "A をベースに焼き込み"),
    "step_reuse_bake": ("baked base reused", "焼き込み済みベースを再利用"),
    "step_train_b": ("train B", "B を学習"),
    "step_reuse_b": ("B reused", "B を再利用"),
    "step_merge": ("merge B − A", "B − A をマージ"),
    "step_preview": ("preview", "プレビュー"),
    "starting": ("starting", "開始中"),
    "stopped": ("stopped: press Run to resume", "停止しました: 実行を押すと続きから再開します"),
    "finished": ("finished", "完了"),
    "already_running": ("a run is in progress: Stop it first", "実行中です。先に停止してください"),
    "not_running": ("nothing is running", "実行中のものはありません"),
    "needs_sd_scripts": (
        "the sd-scripts folder is not set: set it in Settings",
        "sd-scripts フォルダが設定されていません。設定タブで指定してください",
    ),
    # settings tab
    "sd_scripts": ("sd-scripts folder (sd_scripts)", "sd-scripts フォルダ (sd_scripts)"),
    "sd_scripts_info": (
        "a kohya-ss/sd-scripts checkout, or a Kohya's GUI folder with sd-scripts/ in it",
        "kohya-ss/sd-scripts のフォルダ、または sd-scripts/ を含む Kohya's GUI のフォルダ",
    ),
    "python": ("kohya's Python (python)", "kohya の Python (python)"),
    "python_info": ("empty: the checkout's venv, else this Python", "空欄: sd-scripts の venv、なければこの Python"),
    "output_dir": ("Output folder (after a restart)", "出力フォルダ（再起動後に反映）"),
    "language": ("Language (after a restart)", "言語（再起動後に反映）"),
    "save_settings": ("Save settings", "設定を保存"),
    "saved_settings": ("Saved to {path}", "{path} に保存しました"),
    "doctor": ("copylora doctor", "copylora doctor"),
    "sd_scripts_found": ("sd-scripts: {path}; kohya's Python: {python}", "sd-scripts: {path}、kohya の Python: {python}"),
    "sd_scripts_missing": ("sd-scripts: not set (Settings)", "sd-scripts: 未設定（設定タブ）"),
}


def system_language() -> str:
    """"ja" when the system locale is Japanese, else "en"."""
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name)
        if value:
            return "ja" if value.lower().startswith("ja") else "en"
    code = locale.getlocale()[0] or ""
    return "ja" if code.lower().startswith(("ja", "japanese")) else "en"


class Texts:
    """texts("key", **values): the page's text in one language."""

    def __init__(self, language: str):
        if language not in LANGUAGES:
            raise ValueError(language)
        self.language = language
        self._column = LANGUAGES.index(language)

    def __call__(self, key: str, **values: object) -> str:
        text = TEXTS[key][self._column]
        return text.format(**values) if values else text
