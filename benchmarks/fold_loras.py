#!/usr/bin/env python
"""Many LoRAs in one Share file: the independent LoRAs of a `continual.py` run folded by
`loras_to_share` at several basis ranks k, every concept scored again through the file.

Retention of concept j at k = (L_base − L_share) / (L_base − L_lora), its held-out score relative
to its own LoRA (1 = nothing lost), with the base and LoRA losses the run measured on the same
held-out images. Identity retention: the discriminative identity of the concepts the run tested
(`evaluation.discriminative_identity`, same concepts and images), through the file, relative to
the LoRAs'. Also each LoRA's reconstruction error, and bytes: per concept without the basis
(the coefficients), with the basis amortised over the file, and a LoRA file's. The recommended k is
the smallest whose mean retention reaches ``--target``. Output: JSON, a markdown table and a PNG in
``--out``.

    python benchmarks/continual.py --concepts_dir runs/concepts50 --concepts 50 --methods lora --out runs/c50
    python benchmarks/fold_loras.py runs/c50 --concepts_dir runs/concepts50 --out runs/fold50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import share_lab
from benchmarks.continual import concept_loss, hardware, load_base, write_json
from share_diffusers import loras_to_share, read_share
from share_lab import evaluation, world


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a continual.py --out folder whose `lora` method has finished")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64], help="basis ranks to fold at")
    p.add_argument("--concepts_dir", default=None, help="the run's concept folders (default: the shipped ones)")
    p.add_argument("--target", type=float, default=0.97, help="mean retention the recommended k must reach")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def read_loras(run: Path) -> tuple[list[Path], list[str], np.ndarray, np.ndarray, dict]:
    """The run's LoRA files, concept names, base and LoRA held-out losses, and settings."""
    progress_file = run / "lora" / "progress.json"
    if not progress_file.is_file():
        raise SystemExit(f"{run} holds no finished independent-LoRA run ({progress_file} is missing)")
    progress = json.loads(progress_file.read_text())
    settings = progress["settings"]
    names = settings["concepts"]
    if len(progress["R_loss"]) < len(names):
        raise SystemExit(f"{run}: the lora run learned {len(progress['R_loss'])} of {len(names)} concepts; finish it first")
    files = [run / "lora" / "adapters" / f"c{i}.safetensors" for i in range(len(names))]
    base = np.array(json.loads((run / "base_losses.json").read_text())["value"], dtype=float)
    return files, names, base, np.diag(np.array(progress["R_loss"], dtype=float)), settings


def main(argv=None) -> dict:
    args = parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files, names, base, lora, settings = read_loras(run)
    concepts_dir = args.concepts_dir or share_lab.CONCEPTS
    folders = {c.name: c for c in world.list_concepts(concepts_dir)}
    if set(names) - set(folders):
        raise SystemExit(f"the run's concepts are not all in {concepts_dir} (missing: {', '.join(sorted(set(names) - set(folders)))})")
    concepts = [folders[n] for n in names]
    heldout = settings.get("heldout_images", 20)
    pipe = load_base(settings["base"])
    lora_bytes = files[0].stat().st_size
    identity = lora_identity(run)
    select = lambda c: pipe.set_share_concepts(names[identity["concepts"][c]])  # noqa: E731  (the c-th tested concept)
    results = {}
    for k in args.ks:
        path = out / f"folded-k{k}.safetensors"
        report = loras_to_share([str(f) for f in files], path, names=names, basis_rank=k)
        pipe.unload_share()
        pipe.load_share(path)
        losses = []
        for name, concept in zip(names, concepts):
            pipe.set_share_concepts(name)
            losses.append(concept_loss(pipe, concept, heldout))
        retention = (base - np.array(losses)) / (base - lora)
        state, header = read_share(path)
        p = header["concepts"][0]["p"]  # the LoRAs' rank
        coefficients = sum(4 * 2 * layer.k * p for layer in state.layers.values())
        results[k] = {"retention": retention.tolist(), "mean_retention": float(retention.mean()), "min_retention": float(retention.min()),
                      "reconstruction_error": [report[n]["overall"] for n in names], "losses": losses,
                      "bytes_per_concept": coefficients, "bytes_per_concept_with_basis": path.stat().st_size / len(names),
                      "file_bytes": path.stat().st_size}
        if identity:
            found = evaluation.discriminative_identity(pipe, [concepts[j] for j in identity["concepts"]], select, identity["images"])
            results[k].update(identity=found, identity_retention=found["accuracy"] / identity["accuracy"])
        print(f"k = {k}: retention {retention.mean():.3f} (min {retention.min():.3f}), "
              + (f"identity retention {results[k]['identity_retention']:.3f}, " if identity else "")
              + f"{path.stat().st_size / len(names):,.0f} bytes per concept with the basis", flush=True)
        path.unlink()
        path.with_name(path.name + ".lock").unlink(missing_ok=True)
    reached = [k for k in args.ks if results[k]["mean_retention"] >= args.target]
    summary = {"run": str(run), "concepts": names, "lora_bytes": lora_bytes, "target": args.target, "lora_identity": identity,
               "recommended_k": min(reached) if reached else None, "results": results, "hardware": hardware()}
    write_json(out / "fold_loras.json", summary)
    (out / "fold_loras.md").write_text(table(summary))
    plot(summary, out / "fold_loras.png")
    print(table(summary))
    return summary


def lora_identity(run: Path) -> dict | None:
    """The discriminative identity the run measured for its LoRAs (its concepts and images), if it did."""
    results = run / "continual.json"
    if not results.is_file():
        return None
    summary = json.loads(results.read_text())
    found = summary["methods"].get("lora", {}).get("discriminative")
    return found and {"accuracy": found["accuracy"], "concepts": found["concepts"], "images": summary["identity_images"]}


def table(summary: dict) -> str:
    rows = [f"{len(summary['concepts'])} LoRAs (rank 4, {summary['lora_bytes']:,} bytes each) folded into one Share file:", "",
            "| k | mean retention | min retention | mean reconstruction error | bytes / concept (coefficients) | with the basis | vs a LoRA file |",
            "|---|---|---|---|---|---|---|"]
    identity = summary.get("lora_identity")
    if identity:
        rows[2] = rows[2].replace("| mean reconstruction", f"| discriminative identity (the LoRAs: {identity['accuracy']:.2f}) "
                                                         "| identity retention | mean reconstruction")
        rows[3] += "---|---|"
    for k, r in summary["results"].items():
        found = f"{r['identity']['accuracy']:.2f} | {r['identity_retention']:.3f} | " if identity else ""
        rows.append(f"| {k} | {r['mean_retention']:.3f} | {r['min_retention']:.3f} | {found}{np.mean(r['reconstruction_error']):.3f} | "
                    f"{r['bytes_per_concept']:,} | {r['bytes_per_concept_with_basis']:,.0f} | "
                    f"{summary['lora_bytes'] / r['bytes_per_concept_with_basis']:.1f}× smaller |")
    k = summary["recommended_k"]
    rows += ["", f"Recommended k: {k} (the smallest with mean retention ≥ {summary['target']})." if k else
             f"No k tried reaches mean retention {summary['target']}."]
    return "\n".join(rows) + "\n"


def plot(summary: dict, path: Path) -> None:
    from benchmarks.continual import _pyplot

    plt = _pyplot()
    ks = [int(k) for k in summary["results"]]
    r = summary["results"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ks, [r[k]["mean_retention"] for k in r], marker="o", label="mean")
    ax.plot(ks, [r[k]["min_retention"] for k in r], marker=".", ls="--", label="worst concept")
    ax.axhline(summary["target"], color="grey", lw=0.5, ls="--")
    ax.set(xscale="log", xlabel="basis rank k", ylabel="retention (score / its LoRA's)",
           title=f"{len(summary['concepts'])} LoRAs folded into one file")
    ax.minorticks_off()
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
