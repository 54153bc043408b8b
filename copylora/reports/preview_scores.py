"""The preview's scores table: every cell measured against strength 0 of its prompt and seed.

OUT/scores.json (with the thresholds it was made with) and OUT/scores.csv hold the same rows; the
summary line and the copy-machine report's table are made from them.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from copylora.formats.atomic_file import atomic_write
from copylora.reports import image_measures
from copylora.reports.image_measures import Measures

COLUMNS = ["prompt", "seed", "lora", "strength", "structure_kept", "delta_e", "delta_chroma", "changed_share", "image"]


@dataclass(frozen=True)
class Score:
    prompt: str
    seed: int
    lora: str  # the LoRA file at `strength` (the others of a sweep at 0)
    strength: float
    image: str
    measures: Measures

    def row(self) -> dict[str, object]:
        return {"prompt": self.prompt, "seed": self.seed, "lora": self.lora, "strength": self.strength,
                **self.measures.as_dict(), "image": self.image}


def write(scores: list[Score], folder: Path) -> tuple[Path, Path]:
    """folder/scores.json and folder/scores.csv, each written whole or not at all."""
    rows = [score.row() for score in scores]
    document = {"reference": "strength 0 of the same prompt and seed",
                "changed_delta_e": image_measures.CHANGED_DELTA_E, "cells": rows}
    text = io.StringIO()
    table = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    json_path, csv_path = folder / "scores.json", folder / "scores.csv"
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n",
                                                             encoding="utf-8"))
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8"))
    return json_path, csv_path


def read(path: Path) -> list[dict]:
    """The rows of a scores.json."""
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _groups(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    """Rows by (LoRA, strength), in first-seen order, strength 0 (the reference) left out."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        if row["strength"] != 0:
            groups.setdefault((row["lora"], row["strength"]), []).append(row)
    return groups


def summary(rows: list[dict]) -> str:
    """One line: the median structure kept, ΔE and ΔC* over prompts and seeds at each strength (per LoRA)."""
    groups = _groups(rows)
    loras = list(dict.fromkeys(lora for lora, _ in groups))
    parts = []
    for (lora, strength), group in groups.items():
        name = f"{Path(lora).name} " if len(loras) > 1 else ""
        structure, delta_e, delta_chroma = (statistics.median(row[key] for row in group)
                                            for key in ("structure_kept", "delta_e", "delta_chroma"))
        parts.append(f"{name}strength {strength:g}: structure {structure:.2f}, ΔE {delta_e:.1f}, "
                     f"ΔC* {image_measures.signed(delta_chroma, 1)}")
    if not parts:
        return "only strength 0 was made: nothing measured against it"
    count = len({(row["prompt"], row["seed"]) for row in rows})
    return f"medians over {count} image(s) per strength, against strength 0: " + "; ".join(parts)


def markdown_table(rows: list[dict]) -> list[str]:
    """Every measured cell as a Markdown table (strength 0, the reference, left out)."""
    several = len({row["lora"] for row in rows}) > 1
    head = ["prompt", "seed"] + (["LoRA"] if several else []) + ["strength", "structure kept", "ΔE",
                                                                  "ΔC*", "changed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in _groups(rows).values():
        for row in group:
            cells = [row["prompt"] or "(empty prompt)", str(row["seed"]), *([Path(row["lora"]).name] if several else [])]
            cells += [f"{row['strength']:g}", f"{row['structure_kept']:.3f}", f"{row['delta_e']:.2f}",
                      image_measures.signed(row["delta_chroma"], 2), f"{row['changed_share']:.0%}"]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines
