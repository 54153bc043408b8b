"""Pictures of a LoRA at several strengths, made by kohya's own generator (gen_img.py; sdxl_gen_img.py for SDXL).

One gen_img run makes every cell: copylora writes a prompts file (`--from_file`) with one line per
image (a "shot": prompt, seed and each LoRA's multiplier), using gen_img's per-line options
`--am M1,M2,…` (one multiplier per network) and `--d SEED`, and asks for sequential file names, so
the Nth image belongs to the Nth line. Each image's own "seed" PNG text is checked against its line
before the images are renamed and kept. Several LoRAs (a sweep) are all loaded at once; each shot
has at most one of them at a non-zero strength, so strength 0, the image every cell is measured
against, is one shot per prompt and seed, shared by every LoRA's row.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from copylora.errors import CopyloraError
from copylora.formats.lora_file import read_lora
from copylora.kohya.base_model import check_base_model
from copylora.kohya.job import run_kohya

SCRIPTS = {False: "gen_img.py", True: "sdxl_gen_img.py"}
# gen_img strips a line and cuts it at " --", so an empty prompt cannot be written as such; "()" is an
# empty attention group, which its prompt parser turns into no tokens at all: the empty prompt exactly.
EMPTY_PROMPT = "()"
LINE_OPTIONS_SET_HERE = {"am": "--strengths", "d": "--seeds", "f": "copylora (it names the images)"}
# gen_img flags copylora sets, or that would break the one-image-per-line order
FLAGS_SET_HERE = {
    "ckpt": "--base", "network_weights": "--lora", "network_mul": "--strengths", "outdir": "--out",
    "W": "--width", "H": "--height", "steps": "--steps", "seed": "--seeds", "sdxl": "--sdxl",
    "from_file": "--prompt/--prompts", "prompt": "--prompt", "from_module": "--prompt/--prompts",
    "network_module": "copylora", "sequential_file_name": "copylora", "interactive": "copylora",
    "n_iter": "copylora (one image per cell)", "images_per_prompt": "copylora (one image per cell)",
    "shuffle_prompts": "copylora (cells in order)", "use_original_file_name": "copylora",
    "iter_same_seed": "--seeds", "network_merge": "copylora (a merged network ignores --am)",
    "network_merge_n_models": "copylora (a merged network ignores --am)",
}
MARKER = ".copylora-preview"


@dataclass(frozen=True)
class Prompt:
    text: str  # what the picture is of ("" for the LoRA alone)
    options: str  # the user's own gen_img line options, e.g. "--n lowres --l 5"

    @property
    def label(self) -> str:
        return self.text or "(empty prompt)"


@dataclass(frozen=True)
class Shot:
    """One gen_img line and its image."""

    prompt_index: int
    prompt: Prompt
    seed: int
    multipliers: tuple[float, ...]  # one per LoRA, in --network_weights order; at most one not 0

    @property
    def file_name(self) -> str:
        active = [(i, m) for i, m in enumerate(self.multipliers) if m != 0]
        which = f"_lora{active[0][0] + 1}" if active and len(self.multipliers) > 1 else ""
        strength = active[0][1] if active else 0.0
        return f"p{self.prompt_index:02d}_seed{self.seed}{which}_strength{strength:+g}.png"

    @property
    def line(self) -> str:
        text = self.prompt.text or EMPTY_PROMPT
        extra = f" {self.prompt.options}" if self.prompt.options else ""
        return f"{text}{extra} --am {','.join(f'{m:g}' for m in self.multipliers)} --d {self.seed}"


@dataclass(frozen=True)
class Cell:
    """A place in the grid: row (prompt, seed, LoRA), column (strength), and the shot shown there."""

    row: int
    column: int
    lora: int  # index into PreviewJob.loras
    strength: float
    shot: Shot

    @property
    def prompt(self) -> Prompt:
        return self.shot.prompt

    @property
    def seed(self) -> int:
        return self.shot.seed


def parse_prompt(line: str, origin: str) -> Prompt:
    """A prompt as gen_img reads a line: text, then ` --x value` options; copylora's own options refused."""
    line = line.strip()
    if "\n" in line or "\r" in line:
        raise CopyloraError(f"{origin}: one line per prompt, please")
    head, _, tail = (" " + line).partition(" --")
    options = [part.strip() for part in tail.split(" --")] if tail else []
    for option in options:
        name = option.split(" ", 1)[0].lower()
        if name in LINE_OPTIONS_SET_HERE:
            raise CopyloraError(f"{origin}: --{name} is set by {LINE_OPTIONS_SET_HERE[name]}; remove it from the prompt")
        if not re.fullmatch(r"[a-z0-9]+ .+", option, re.IGNORECASE):
            raise CopyloraError(f"{origin}: '--{option}' is not a gen_img prompt option (--n TEXT, --l SCALE, …)")
    return Prompt(head.strip(), " ".join(f"--{option}" for option in options))


def read_prompts(path: Path) -> list[Prompt]:
    """A prompts file: one prompt per line, blank lines and # comments skipped (as gen_img does)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CopyloraError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise CopyloraError(f"{path}: not UTF-8 text (gen_img reads prompts files as UTF-8)") from exc
    prompts = [parse_prompt(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1)
               if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CopyloraError(f"{path}: no prompts in this file (blank lines and # comments are skipped)")
    return prompts


def check_passthrough(args: list[str]) -> None:
    for arg in args:
        if arg.startswith("--"):
            name = arg[2:].split("=", 1)[0]
            if name in FLAGS_SET_HERE:
                raise CopyloraError(f"-- {arg}: set by {FLAGS_SET_HERE[name]}; remove it from the gen_img arguments")


@dataclass
class PreviewJob:
    sd_scripts: Path
    python: str
    sdxl: bool
    base: Path
    loras: list[Path]
    out: Path
    cells: list[Cell]
    width: int
    height: int
    steps: int
    gen_img_args: list[str]

    @property
    def script(self) -> str:
        return SCRIPTS[self.sdxl]

    @property
    def prompts_path(self) -> Path:
        return self.out / "prompts.txt"

    @property
    def images_dir(self) -> Path:
        return self.out / "images"

    @property
    def gen_dir(self) -> Path:
        return self.out / ".gen_img"  # gen_img's own output, renamed into images/ once checked

    @property
    def differences_dir(self) -> Path:
        return self.out / "differences"  # the ΔE heatmaps (copylora preview's own)

    @property
    def grid_path(self) -> Path:
        return self.out / "grid.png"

    @property
    def shots(self) -> list[Shot]:
        """Each image to make, once, in the grid's order."""
        return list(dict.fromkeys(cell.shot for cell in self.cells))

    @property
    def prompts_text(self) -> str:
        header = ["# written by copylora preview for kohya's " + self.script,
                  "# one line per image: --am is each LoRA's strength, --d the seed; "
                  f"{EMPTY_PROMPT} is the empty prompt"]
        return "\n".join(header + [shot.line for shot in self.shots]) + "\n"

    @property
    def command(self) -> list[str]:
        count = len(self.loras)
        return [self.python, self.script, "--ckpt", str(self.base), "--outdir", str(self.gen_dir),
                "--from_file", str(self.prompts_path), "--network_module", *["networks.lora"] * count,
                "--network_weights", *map(str, self.loras), "--network_mul", *["1"] * count, "--W", str(self.width),
                "--H", str(self.height), "--steps", str(self.steps), "--sequential_file_name", *self.gen_img_args]

    def describe(self) -> str:
        return (f"# command, run in {self.sd_scripts}:\n{shlex.join(self.command)}\n"
                f"# {self.prompts_path}:\n{self.prompts_text}")


def plan(
    sd_scripts: Path, python: str, sdxl: bool, base: Path, loras: list[Path], out: Path, prompts: list[Prompt],
    seeds: list[int], strengths: list[float], width: int, height: int, steps: int, gen_img_args: list[str],
) -> PreviewJob:
    """Check everything; writes nothing. Strength 0 is always made (first column unless given): it is the
    reference every other cell is measured against."""
    if not (sd_scripts / SCRIPTS[sdxl]).is_file():
        raise CopyloraError(f"{sd_scripts / SCRIPTS[sdxl]}: not in this checkout (too old an sd-scripts?)")
    check_base_model(base)
    for lora in loras:
        if not lora.is_file():
            raise CopyloraError(f"{lora}: no such LoRA file")
        read_lora(lora)  # a LoRA's keys and shapes, checked now rather than inside gen_img after the model loads
    if len({lora.resolve() for lora in loras}) != len(loras):
        raise CopyloraError(f"--loras {' '.join(map(str, loras))}: a file is given twice")
    for name, value in (("--width", width), ("--height", height)):
        if value < 8 or value % 8:
            raise CopyloraError(f"{name} {value}: a positive multiple of 8, please (the VAE works in 8-pixel blocks)")
    if steps < 1:
        raise CopyloraError(f"--steps {steps}: at least 1")
    if not seeds or not strengths:
        raise CopyloraError("--seeds and --strengths need at least one value each")
    if any(seed < 0 for seed in seeds):
        raise CopyloraError(f"--seeds {' '.join(map(str, seeds))}: seeds are whole numbers ≥ 0")
    check_passthrough(gen_img_args)
    if 0 not in strengths:
        strengths = [0.0, *strengths]
    rows = [(p, prompt, seed, lora) for p, prompt in enumerate(prompts) for seed in seeds for lora in range(len(loras))]

    def shot(p: int, prompt: Prompt, seed: int, lora: int, strength: float) -> Shot:
        return Shot(p, prompt, seed, tuple(strength if i == lora else 0.0 for i in range(len(loras))))

    cells = [Cell(r, c, lora, strength, shot(p, prompt, seed, lora, strength))
             for r, (p, prompt, seed, lora) in enumerate(rows) for c, strength in enumerate(strengths)]
    return PreviewJob(sd_scripts, python, sdxl, base.resolve(), [lora.resolve() for lora in loras], out.resolve(),
                      cells, width, height, steps, list(gen_img_args))


def _check_ours(folder: Path) -> None:
    """Refuse a non-empty folder that copylora preview did not make (it would be emptied)."""
    if folder.exists() and not (folder / MARKER).is_file() and any(folder.iterdir()):
        raise CopyloraError(f"{folder}: exists and was not made by copylora preview; move it away")


def _refill(folder: Path) -> None:
    """Empty a folder copylora preview made (or make it), marked as ours."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("made by copylora preview; emptied and refilled on every run\n", encoding="utf-8")


def generate(job: PreviewJob) -> tuple[list[Path], float]:
    """Run gen_img once for every shot; the kept images in cell order, and the seconds gen_img took."""
    from PIL import Image  # Pillow: only when pictures are made

    for folder in (job.gen_dir, job.images_dir, job.differences_dir):
        _check_ours(folder)
    job.out.mkdir(parents=True, exist_ok=True)
    _refill(job.gen_dir)
    job.prompts_path.write_text(job.prompts_text, encoding="utf-8")
    seconds = run_kohya(job.command, job.sd_scripts, job.script)
    made = sorted(job.gen_dir.glob("*.png"))
    shots = job.shots
    if len(made) != len(shots):
        raise CopyloraError(f"{job.gen_dir}: kohya's {job.script} wrote {len(made)} image(s) for {len(shots)} "
                            f"prompt lines of {job.prompts_path}")
    for path, shot in zip(made, shots):
        with Image.open(path) as image:
            seed = image.info.get("seed")
        if seed != str(shot.seed):
            raise CopyloraError(f"{path}: made with seed {seed}, but its line in {job.prompts_path} asks for {shot.seed}")
    _refill(job.images_dir)
    _refill(job.differences_dir)
    kept: dict[Shot, Path] = {}
    for path, shot in zip(made, shots):
        kept[shot] = job.images_dir / shot.file_name
        path.replace(kept[shot])
    shutil.rmtree(job.gen_dir)
    return [kept[cell.shot] for cell in job.cells], seconds
