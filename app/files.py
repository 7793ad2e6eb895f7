"""The files the web UI reads and writes: the Share file as loaded (with its stat signature and
hash, so a change on disk is noticed), its summary tables, and the metadata of generated PNGs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

import share_diffusers

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train" / "learn_concept.py"


# -- the Share file as loaded -----------------------------------------------------------------------


@dataclass
class Loaded:
    """One version of the Share file, as loaded into the pipeline."""

    version: int = 0
    signature: tuple | None = None
    state: share_diffusers.ShareState | None = None
    header: dict = field(default_factory=dict)
    sha256: str | None = None
    size: int = 0
    error: str | None = None  # the newest file on disk could not be loaded (this version is older)

    @property
    def names(self) -> list[str]:
        return self.state.names if self.state is not None else []

    @property
    def triggers(self) -> dict[str, str | None]:
        return {c["name"]: c.get("trigger") for c in (self.state.concepts if self.state is not None else [])}


def file_signature(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def concept_table(loaded: Loaded) -> list[dict]:
    """Per concept: name, trigger, date, steps, images, bytes in the file, LoRA-equivalent bytes, merge errors."""
    header = loaded.header or {}
    layers = header.get("base_model", {}).get("layers", {})
    ks = header.get("k", {})
    rows = []
    for c in header.get("concepts", []):
        p = int(c.get("p", 1))
        size = sum(int(ks.get(layer, 0)) * p * 2 * 4 for layer in layers)  # B and A, float32
        lora = sum(p * (n + d) * 4 for layer, (n, d) in layers.items() if int(ks.get(layer, 0)))
        rows.append({
            "name": c["name"], "trigger": c.get("trigger"), "date": c.get("date"), "steps": c.get("steps"),
            "num_images": c.get("num_images"), "bytes": size, "lora_bytes": lora,
            "merge_errors": [float(e) for e in c.get("merge_errors", [])],
        })
    return rows


def file_summary(loaded: Loaded) -> dict:
    header = loaded.header or {}
    layers = header.get("base_model", {}).get("layers", {})
    ks = {layer: int(k) for layer, k in header.get("k", {}).items()}
    basis = sum((n + d) * ks.get(layer, 0) * 4 for layer, (n, d) in layers.items())
    rows = concept_table(loaded)
    return {
        "concepts": len(rows), "file_bytes": loaded.size, "basis_bytes": basis,
        "concept_bytes": sum(r["bytes"] for r in rows), "lora_bytes": sum(r["lora_bytes"] for r in rows),
        "layers": len(layers), "k_min": min(ks.values(), default=0), "k_max": max(ks.values(), default=0),
        "config": header.get("config", {}),
    }


def read_png_metadata(path) -> dict:
    """The text chunks of a PNG written by the studio (``parameters`` and ``share_diffusers``)."""
    with Image.open(path) as im:
        info = dict(getattr(im, "text", {}) or im.info)
    out = {k: v for k, v in info.items() if isinstance(v, str)}
    if "share_diffusers" in out:
        out["share_diffusers"] = json.loads(out["share_diffusers"])
    return out
