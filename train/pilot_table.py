"""Write docs/results/pilot-bases.md from docs/results/pilot-bases.json (train/pilot_bases.py).

Why: the table is read by people choosing the tiny base v4 design; the JSON is the record.

    python train/pilot_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "pilot-bases.json"
PRETRAINED = {"assets/tiny-base": "6000 × 32 + ",  # tiny base v3, when the pilots that started from it ran
              "runs/pilots/P2/base": "5000 × 16 + ",
              "runs/pilots/V2/base": "10000 × 32 + ", "runs/pilots/V2b/base": "15000 × 32 + ",
              "runs/pilots/V2c/base": "20000 × 32 + ", "runs/pilots/G1/base": "24000 × 32 + ",
              "runs/pilots/G2/base": "28000 × 32 + ", "runs/pilots/G3/base": "32000 × 32 + "}  # steps of an --init-from base
WHAT = {
    "P0": "from scratch: today's world, today's UNet (cross-attn 8×8 only)",
    "P1": "from scratch: rich world, today's UNet",
    "P2": "from scratch: rich world, cross-attn at 16×16 and 8×8",
    "P2b": "P2 continued from its weights (a new cosine schedule)",
    "P3": "from scratch: today's world and the shipped recipe (30,000 images, 6000 × 32, lr 7e-4), cross-attn at 16×16 "
          "and 8×8: the shipped base with one change (2 threads)",
    "V2": "from scratch: world v2 (10 silhouettes × 5 layouts × 8 colours; 239 objects kept out for concepts), "
          "today's UNet, 60,000 images, 10,000 × 32, lr 7e-4 (2 threads)",
    "V2b": "V2 continued: 5000 × 32 more at lr 3e-4 (a new cosine schedule), the same 60,000 images (2 threads)",
    "V2b-reader": "V2b measured again with the parts reader (colours off the pixels)",
    "V2bD": "V2b with the world-v2 decoder D1 (latents unchanged), the parts reader",
    "V2c": "V2b continued: 5000 × 32 more at lr 2e-4, with D1's decoder (2 threads)",
    "VP": "shipped base fine-tuned on today's world to predict v instead of the noise (--prediction-type v_prediction)",
    "V2d": "V2c (tiny base v4) continued: 5000 × 32 more at lr 2e-4 (2 threads)",
    "VQ": "V2c fine-tuned to predict v with every timestep weighing 1 (--snr-gamma 0: min-SNR gave t ≈ T no weight), 2500 × 32 at lr 2e-4",
    "G1": "V2c (tiny base v4) grown by a 4×4 level of resnets (add_third_level; the trained weights kept, the new "
          "level random), then 4000 × 32 at lr 3e-4 (2 threads)",
    "G2": "G1 (tiny base v5) fine-tuned to predict v with every timestep weighing 1 (--snr-gamma 0), 4000 × 32 at "
          "lr 2e-4 (2 threads)",
    "G3": "G2 continued predicting v, min-SNR-5 weights with a floor of 1 on the x0 error (--snr-floor 1: steps "
          "near T weigh as in G2, the clean ones capped as in G1), 4000 × 32 at lr 2e-4 (2 threads)",
    "G4": "G3 continued the same way, 4000 × 32 more at lr 2e-4 (a new cosine schedule): tiny base v6 (2 threads)",
    "shipped": "the shipped base as is (today's world and UNet, 6000 steps × batch 32)",
    "F0": "shipped base + fine-tuning on today's world (control: more steps, same world)",
    "F1": "shipped base + fine-tuning on the rich world, today's UNet",
    "F2": "shipped base + fine-tuning on the rich world, + cross-attn at 16×16 (new blocks zero-initialised)",
}


def pct(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def reach_table(reach: dict, suffix: str) -> list[str]:
    """Which adapter draws the concepts on a base: `train/pilot_bases.py reach`."""
    lines = []
    for base, recipes in reach.items():
        lines += ["", f"## Adapter reach on {base}" + (" (world v2 concepts)" if suffix else ""), "",
                  "The same 5 training renders, batch size and seed as the reference LoRA; only what the adapter may change differs.",
                  "Generated identity on held-out prompts (the classifier above). Grids, one row per concept: 3 training renders ·",
                  "8 images the trained adapter draws from held-out prompts (their own backgrounds and positions).", "",
                  "| recipe | what it trains | steps, lr | identity mean | per concept | train s / concept | command |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in recipes.items():
            recipe = r["recipe"]
            trains = {"lora": f"rank-4 LoRA on {', '.join(recipe.get('targets', []))}",
                      "share": f"Share (p = 1, φ = 2) on {', '.join(recipe.get('targets', []))}"}.get(recipe["kind"], "every UNet weight")
            per = ", ".join(f"{k}: {v:.2f}" for k, v in r["per_concept"].items())
            seconds = sum(s["train"] for s in r["seconds"]) / len(r["seconds"])
            lines.append(f"| {name} | {trains} | {recipe['steps']}, {recipe['lr']:g} | {pct(r['mean'])} | {per} "
                         f"({r.get('images_per_concept', '?')} images each) | {seconds:.0f} | `{r['command']}` |")
        lines += [""] + [f"![{name}](reach-{base}-{name}{suffix}.png)" for name in recipes
                         if (RESULTS.parent / f"reach-{base}-{name}{suffix}.png").exists()]
    return lines


def classifier_line(c: dict) -> str:
    return (f"fresh held-out renders {pct(c.get('fresh_renders_accuracy'))} / their VAE round trips "
            f"{pct(c.get('fresh_renders_vae_round_trip_accuracy'))}; the concepts' 20 held-out renders each "
            f"{pct(c.get('concept_heldout_accuracy'))} / round trips {pct(c.get('concept_heldout_vae_round_trip_accuracy'))}"
            f" (round-trip mean abs. error {c.get('concept_heldout_vae_round_trip_mean_abs_error', float('nan')):.3f} of the range).")


def parts_line(c: dict) -> str:
    f, r = c.get("fresh_renders", {}), c.get("fresh_renders_vae_round_trip", {})
    heads = ", ".join(f"{k} {pct(f.get(k))}" for k in ("shape", "layout", "colours", "first_colour", "all_parts"))

    def identity(x) -> str:  # one rate, or (the parts reader) overall and per layout
        if not isinstance(x, dict):
            return pct(x)
        return f"{pct(x['all'])} (" + ", ".join(f"{k} {pct(v)}" for k, v in x.items() if k != "all") + ")"
    return (f"on 600 fresh renders (both sizes) {heads} (through the VAE: all parts {pct(r.get('all_parts'))}); the "
            f"{c.get('concepts')} concepts' held-out renders named right {identity(c.get('concept_heldout_identity'))}, "
            f"their VAE round trips {identity(c.get('concept_heldout_vae_round_trip_identity'))}; near misses "
            f"rejected {pct(c.get('near_misses_rejected'))}.")


def decoder_table(decoders: dict) -> list[str]:
    """`train/pilot_bases.py decoder`: the concepts' colours after a round trip, before and after."""
    lines = ["| decoder | fine-tuned on | concepts' colours kept, before → after (split, striped, outlined, dotted; all) | min (2 threads) |",
             "|---|---|---|---|"]
    for name, d in decoders.items():
        b, a = d["concept_colours_kept_before"], d["concept_colours_kept_after"]
        kept = ", ".join(f"{pct(b[k])} → {pct(a[k])}" for k in ("split", "striped", "outlined", "dotted", "all"))
        lines.append(f"| {name} | {d['images']} world-v2 scenes, {d['steps']} × {d['batch_size']} at {d['lr']:g} | {kept} | "
                     f"{d['seconds'] / 60:.0f} |")
    return lines


def pilot_table(pilots: dict, suffix: str) -> list[str]:
    """One row per pilot base: its pretraining, its quality, and identity on the concepts measured."""
    lines = ["| pilot | what changed | denoiser steps × batch / min (1 thread) | base shape / colour / bg / position "
             "| untrained base identity | LoRA identity mean | min | per concept |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in pilots.items():
        pre = p.get("pretraining")
        cfg = p.get("config", {})
        if pre:
            plus = PRETRAINED.get(cfg.get("init_from"), "")
            steps = f"{plus}{pre['steps']} × {cfg.get('batch_size')} / {pre['denoiser_seconds'] / 60:.1f}"
            if pre.get("resumed_at_step"):  # the minutes are those of the last process only
                steps += f" (steps {pre['resumed_at_step']}–{pre['steps']}; resumed)"
        else:
            planned = f"(not finished: {cfg.get('steps')} × {cfg.get('batch_size')} planned)"
            shipped = str(cfg.get("base", "")).rstrip("/").endswith("assets/tiny-base")
            steps = ("6000 × 32 / 38 (2 threads, README)" if shipped else
                     f"measured only: `{cfg['base']}`" if cfg.get("base") else planned)
        q = p.get("base_quality", {})
        quality = " / ".join(pct(q.get(k)) for k in ("shape", "colour", "background", "position"))
        if "column" in q:  # measured since pilot G3: position's horizontal and vertical halves
            quality += f" (column {pct(q['column'])}, row {pct(q['row'])})"
        u, lora = p.get("untrained_identity", {}), p.get("lora_identity", {})
        per = ", ".join(f"{v:.2f}" for v in lora.get("per_concept", {}).values())
        lines.append(f"| {name} | {WHAT.get(name, '')} | {steps} | {quality} | {pct(u.get('mean'))} | "
                     f"{pct(lora.get('mean'))} | {pct(lora.get('min'))} | {per} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{p['command']}`" for name, p in pilots.items()]
    lines += ["", "Grids, one row per concept: 3 training renders · 6 images the reference LoRA generates from",
              "held-out prompts · 2 images the untrained base generates from the same prompts.", ""]
    lines += [f"![{name}](pilot-bases-{name}{suffix}.png)" for name in pilots
              if (RESULTS.parent / f"pilot-bases-{name}{suffix}.png").exists()]
    return lines


def main() -> None:
    data = json.loads(RESULTS.read_text())
    lines = [
        "# Pilot bases (issue 12, step 1)",
        "",
        "Produced by `train/pilot_bases.py` (one process at a time, 1 CPU thread, on the shared 2-core CPU);",
        "this file by `python train/pilot_table.py`. Every pilot reuses the shipped VAE and is measured on the",
        f"same {len(data.get('concepts', []))} novel concepts of `lab/share_lab/pilot_world.py` (`make_novel_concept(i, 12)`).",
        "",
        "Identity classifier (`python train/pilot_bases.py prepare`; classes: the concepts + \"none\" = rich and plain",
        "scenes, near misses sharing the concept's colours or silhouette, and heavily blurred concepts):",
        classifier_line(data.get("classifier", {})),
        "",
    ]
    lines += pilot_table(data.get("pilots", {}), "")
    lines += reach_table(data.get("reach", {}), "")
    if "pilots-v2" in data or "reach-v2" in data:
        concepts = ", ".join(c["name"] for c in data.get("concepts-v2", []))
        lines += ["", "## World v2: concepts that are new combinations of parts the base draws", "",
                  "`lab/share_lab/pilot_world.py`'s world v2 (10 silhouettes × solid, split, outlined, striped, dotted × 8",
                  "colours) keeps one in seven two-colour objects (silhouette, layout, colour pair: 239) out of pretraining;",
                  f"its concepts are those objects (`make_combination_concept(i)`; measured: {concepts}).",
                  "",
                  "Identity: the parts reader `share_lab.parts` — colours read off the pixels (the most-covered pure palette",
                  "colours; an outlined object's body is the colour lying deeper inside, a dotted one's the colour covering",
                  "more), silhouette, layout and \"a clear object\" by a CNN on role maps (`python train/pilot_bases.py",
                  "--concept-world v2 [--vae FOLDER] prepare --images 12000 --steps 5000 --width 32`, half its images through",
                  "that VAE). An image shows concept c",
                  "when every part is c's, so one reader names all 239 and a near miss (one part wrong) is something else. Rows",
                  "V2 and V2b below were measured with the first version, one CNN for every part (on the concepts' renders",
                  "0.72, round trips 0.56): " + parts_line(data.get("classifier-v2", {})), ""]
        if "decoders-v2" in data:
            lines += ["A decoder fine-tuned on world v2 (`python train/pilot_bases.py --concept-world v2 decoder --name D1",
                      "--images 16000 --steps 2500`; the encoder, hence every latent, unchanged):", ""]
            lines += decoder_table(data["decoders-v2"]) + [""]
        v2 = {name: {"pretraining": data.get("pilots", {}).get(name, {}).get("pretraining")} | p  # measured after pretraining
              for name, p in data.get("pilots-v2", {}).items()}
        lines += pilot_table(v2, "-v2")
        lines += reach_table(data.get("reach-v2", {}), "-v2")
    out = RESULTS.parent / "pilot-bases.md"
    kept = out.read_text().partition("\n## Findings")[2] if out.exists() else ""  # hand-written, kept
    out.write_text("\n".join(lines) + "\n" + ("\n## Findings" + kept if kept else ""))


if __name__ == "__main__":
    main()
