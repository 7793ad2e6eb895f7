#!/usr/bin/env python
"""Continual benchmark: concepts of the procedural world learned one after another, Share against
the baselines, all run by this script with the same data, steps and tuning effort.

Methods
- ``share``        ``train/learn_concept.py`` per concept into one Share file (the real product path)
- ``lora``         an independent PEFT LoRA per concept (rank 4, same layers): no forgetting by
                   construction, one file per concept — the quality reference
- ``naive``        ONE LoRA fine-tuned on concept after concept: what forgetting looks like
- ``joint``        one LoRA trained on all concepts' data at once (not continual; an upper bound
                   for a single shared adapter), evaluated at the end only

Scores: R[i, j] = normalised held-out score on concept j after learning concept i (0 = base model,
1 = the shipped reference LoRA); from R: average score, forgetting, backward transfer. At the end
also identity accuracy of generated images (the world's classifier), drift on prompts without a
concept, bytes stored per concept, trainable parameters and wall time. Output: JSON, a markdown
table and a PNG plot in ``--out``.

    python benchmarks/continual.py                 # 10 concepts, full run (CPU: about an hour)
    python benchmarks/continual.py --quick         # 2 concepts, few steps: a smoke test
    # the same full run as two processes (one per CPU core), then one table and plot:
    python benchmarks/continual.py --methods share lora --out runs/cA & \
    python benchmarks/continual.py --methods naive joint --out runs/cB; wait
    python benchmarks/continual.py --combine runs/cA runs/cB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

import share_diffusers  # noqa: F401
import share_lab
from share_diffusers import read_share
from share_diffusers.training import read_instance_images
from share_lab import evaluation, world
from share_lab.baselines import train_lora_baseline

ROOT = share_lab.ROOT

METHODS = ("share", "lora", "naive", "joint")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=str(share_lab.TINY_BASE))
    p.add_argument("--concepts", type=int, default=10, help="how many, in the order of --concepts_dir")
    p.add_argument("--concepts_dir", default=str(share_lab.CONCEPTS), help="concept folders with reference numbers")
    p.add_argument("--steps", type=int, default=400, help="training steps per concept, every method")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="learning rates tried on the first concept, per method")
    p.add_argument("--lr", nargs="+", default=[], metavar="FAMILY=LR",
                   help="skip tuning: e.g. share=3e-3 lora=1e-2 (lora also sets naive and joint)")
    p.add_argument("--images", type=int, default=100,
                   help="generated images per concept for identity accuracy (its held-out prompts, cycled with new seeds)")
    p.add_argument("--share_args", default="", help="extra flags for learn_concept.py (e.g. '--coef_rank 2')")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="no training: merge runs of different methods (their --out or continual.json; e.g. run in parallel) into --out")
    p.add_argument("--compare", nargs=2, metavar="RUN:METHOD",
                   help="no training: per-concept identity of two finished runs (their --out or continual.json), "
                        "e.g. runs/a:lora runs/b:lora where b ran with another --seed")
    p.add_argument("--quick", action="store_true", help="2 concepts, 10 steps, one learning rate, 2 images")
    args = p.parse_args(argv)
    try:
        args.lr = {family: float(lr) for family, lr in (item.split("=") for item in args.lr)}
    except ValueError:
        p.error(f"--lr takes FAMILY=LR pairs such as share=3e-3, got {args.lr}")
    if set(args.lr) - {"share", "lora"}:
        p.error(f"--lr families are share and lora, got {sorted(args.lr)}")
    if args.quick:
        args.concepts, args.steps, args.lrs, args.images = 2, 10, args.lrs[:1], 2
    return args


# -- shared pieces ---------------------------------------------------------------------------------


def load_base(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_lora(pipe, adapter: str, concepts, steps: int, lr: float, args) -> float:
    """Train (or keep training) a PEFT LoRA on the concepts' training images; returns wall seconds."""
    started = time.time()
    examples = [ex for c in concepts for ex in read_instance_images(c.path / "train", None)]
    train_lora_baseline(pipe, adapter, examples, steps, lr, args.batch_size, args.lora_rank, args.seed)
    return time.time() - started


def lora_numbers(pipe, adapter: str) -> tuple[int, int]:
    """Trainable parameters and fp32 bytes of one LoRA adapter."""
    n = sum(p.numel() for name, p in pipe.unet.named_parameters() if f".{adapter}." in name and "lora_" in name)
    return n, 4 * n


# -- the methods --------------------------------------------------------------------------------------


def run_share(args, concepts, lr, out: Path, evaluate=True) -> dict:
    share = out / "share.safetensors"
    share.unlink(missing_ok=True)
    T = len(concepts)
    R = np.zeros((T, T))
    wall = 0.0
    pipe = load_base(args.base)
    for i, c in enumerate(concepts):
        cmd = [sys.executable, str(ROOT / "train" / "learn_concept.py"), "--pretrained_model_name_or_path", args.base,
               "--instance_data_dir", str(c.path / "train"), "--share_path", str(share), "--output_dir", str(out / "runs" / c.name),
               "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size), "--learning_rate", str(lr),
               "--center_crop", "--report_to", "none", "--num_validation_images", "1", "--seed", str(args.seed), *args.share_args.split()]
        started = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        if result.returncode:
            raise RuntimeError(f"learn_concept.py failed on {c.name}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        report = json.loads((out / "runs" / c.name / "report.json").read_text())
        wall += time.time() - started
        if not evaluate:
            continue
        pipe.unload_share()
        pipe.load_share(share)
        for j in range(i + 1):
            pipe.set_share_concepts(concepts[j].name)
            R[i, j] = evaluation.concept_score(pipe, concepts[j])
        print(f"  share: after {c.name}: " + " ".join(f"{x:.2f}" for x in R[i, : i + 1]) + f"  (wall {report['wall_time_s']} s)")
    state, header = read_share(share)
    last = state.names[-1]
    coef_bytes = sum(4 * 2 * layer.k * next(c["p"] for c in header["concepts"] if c["name"] == last) for layer in state.layers.values())
    k_final = {l.k for l in state.layers.values()}
    return {"R": R, "pipe": pipe, "select": lambda j: pipe.set_share_concepts(concepts[j].name), "wall_s": wall,
            "bytes_per_concept": coef_bytes, "file_bytes": share.stat().st_size,
            "trainable_params": share_trainable_params(state, args), "k": [min(k_final), max(k_final)],
            "merge_errors": {c["name"]: c["merge_errors"] for c in state.concepts}}


def share_trainable_params(state, args) -> int:
    """Trainable numbers of the last concept's run: coefficients + temporary directions."""
    flags = args.share_args.split()
    get = lambda flag, default: int(flags[flags.index(flag) + 1]) if flag in flags else default  # noqa: E731
    p, phi = get("--coef_rank", 1), get("--num_extra_directions", 2)
    return sum(2 * layer.k * p + phi * (n + d) + 2 * phi * p for layer in state.layers.values() for n, d in [layer.shape])


def run_lora(args, concepts, lr, out: Path, evaluate=True) -> dict:
    T = len(concepts)
    R = np.zeros((T, T))
    pipe = load_base(args.base)
    wall = 0.0
    for i, c in enumerate(concepts):
        wall += train_lora(pipe, f"c{i}", [c], args.steps, lr, args)
        if evaluate:
            for j in range(i + 1):  # concept j uses its own LoRA, trained once: no forgetting
                pipe.set_adapters([f"c{j}"])
                R[i, j] = evaluation.concept_score(pipe, concepts[j])
            print(f"  lora: after {c.name}: " + " ".join(f"{x:.2f}" for x in R[i, : i + 1]))
    params, nbytes = lora_numbers(pipe, "c0")
    return {"R": R, "pipe": pipe, "select": lambda j: pipe.set_adapters([f"c{j}"]), "wall_s": wall,
            "bytes_per_concept": nbytes, "trainable_params": params}


def run_naive(args, concepts, lr, out: Path, evaluate=True) -> dict:
    T = len(concepts)
    R = np.zeros((T, T))
    pipe = load_base(args.base)
    wall = 0.0
    for i, c in enumerate(concepts):
        wall += train_lora(pipe, "seq", [c], args.steps, lr, args)
        for j in range(i + 1):
            R[i, j] = evaluation.concept_score(pipe, concepts[j])
        print(f"  naive: after {c.name}: " + " ".join(f"{x:.2f}" for x in R[i, : i + 1]))
    params, nbytes = lora_numbers(pipe, "seq")
    return {"R": R, "pipe": pipe, "select": lambda j: None, "wall_s": wall, "bytes_per_concept": nbytes / T, "trainable_params": params}


def run_joint(args, concepts, lr, out: Path, evaluate=True) -> dict:
    T = len(concepts)
    R = np.full((T, T), np.nan)
    pipe = load_base(args.base)
    wall = train_lora(pipe, "joint", concepts, args.steps * T, lr, args)
    R[-1] = [evaluation.concept_score(pipe, c) for c in concepts]
    print("  joint: " + " ".join(f"{x:.2f}" for x in R[-1]))
    params, nbytes = lora_numbers(pipe, "joint")
    return {"R": R, "pipe": pipe, "select": lambda j: None, "wall_s": wall, "bytes_per_concept": nbytes / T, "trainable_params": params}


RUNNERS = {"share": run_share, "lora": run_lora, "naive": run_naive, "joint": run_joint}
LR_FROM = {"share": "share", "lora": "lora", "naive": "lora", "joint": "lora"}


def tune(args, concept, out: Path) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """The same learning-rate sweep for Share and for LoRA, on the first concept only: the best
    learning rate per family, and every score of the sweep."""
    best, sweeps = {}, {}
    for method in sorted({LR_FROM[m] for m in args.methods}):
        if method in args.lr:
            best[method] = args.lr[method]
            continue
        if len(args.lrs) == 1:
            best[method] = args.lrs[0]
            continue
        scores = {}
        for lr in args.lrs:
            run = RUNNERS[method](args, [concept], lr, out / f"tune-{method}-{lr:g}", evaluate=False)
            if method == "share":
                run["pipe"].load_share(out / f"tune-{method}-{lr:g}" / "share.safetensors")
            run["select"](0)
            scores[lr] = evaluation.concept_score(run["pipe"], concept)
        best[method], sweeps[method] = max(scores, key=scores.get), scores
        print(f"tuning {method}: " + ", ".join(f"lr {lr:g} → {s:.3f}" for lr, s in scores.items()) + f"; using {best[method]:g}")
    return best, sweeps


def final_metrics(run, concepts, classifier, prompts, references, args) -> dict:
    """Identity accuracy per concept and drift on no-concept prompts, in the method's final state."""
    pipe, identity = run["pipe"], []
    for j, c in enumerate(concepts):
        run["select"](j)
        identity.append(evaluation.generation_metrics(pipe, c, classifier, n=args.images, seed=args.seed)["identity"])
    run["select"](len(concepts) - 1)  # the last concept active on prompts that do not mention it
    return {"identity": identity, "drift": evaluation.drift(pipe, prompts, references, seed=args.seed)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return write_results(combine([read_run(run) for run in args.combine]), out)
    if args.compare:
        print(compare(args.compare))
        return {}
    concepts = world.list_concepts(args.concepts_dir)[: args.concepts]
    torch.manual_seed(args.seed)
    lrs, sweeps = tune(args, concepts[0], out)
    classifier = evaluation.load_identity_classifier()
    prompts = evaluation.no_concept_prompts(8, args.seed)
    references = evaluation.generate(load_base(args.base), prompts, args.seed)
    results = {}
    for method in args.methods:
        print(f"== {method} (lr {lrs[LR_FROM[method]]:g})")
        run = RUNNERS[method](args, concepts, lrs[LR_FROM[method]], out / method)
        metrics = evaluation.continual_metrics(np.nan_to_num(run["R"])) if method != "joint" else {"average_score": float(np.mean(run["R"][-1]))}
        extra = final_metrics(run, concepts, classifier, prompts, references, args)
        results[method] = {"lr": lrs[LR_FROM[method]], "R": run["R"].tolist(), **metrics, **extra,
                           "identity_mean": float(np.mean(extra["identity"])),
                           **{k: v for k, v in run.items() if k not in ("R", "pipe", "select")}}
    summary = {"concepts": [c.name for c in concepts], "steps": args.steps, "batch_size": args.batch_size, "images": args.images,
               "lora_rank": args.lora_rank, "share_args": args.share_args, "lr_sweeps": sweeps, "methods": results,
               "hardware": hardware(), "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    return write_results(summary, out)


def write_results(summary: dict, out: Path) -> dict:
    (out / "continual.json").write_text(json.dumps(summary, indent=2, default=float))
    (out / "continual.md").write_text(table(summary))
    plot(summary, out / "continual.png")
    print(table(summary))
    return summary


def read_run(run: str) -> dict:
    """The summary of a finished run, given its --out folder or its continual.json."""
    path = Path(run) / "continual.json" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise SystemExit(f"no benchmark results at {path} (give a run's --out folder or its continual.json)")
    return json.loads(path.read_text())


def combine(parts: list[dict]) -> dict:
    """One summary from runs of different methods with the same settings (refused otherwise)."""
    same = ("concepts", "steps", "batch_size", "images", "lora_rank", "share_args")
    for part in parts[1:]:
        differ = [k for k in same if part[k] != parts[0][k]]
        if differ:
            raise SystemExit(f"--combine: the runs differ in {', '.join(differ)}; only runs of one setting combine.")
    summary = dict(parts[0], methods={}, lr_sweeps={}, command=[p["command"] for p in parts])
    for part in parts:
        summary["methods"].update(part["methods"])
        summary["lr_sweeps"].update(part["lr_sweeps"])
    return summary


def compare(specs: list[str]) -> str:
    """Identity of method A in run A against method B in run B, concept by concept."""
    runs = []
    for spec in specs:
        run, _, method = spec.rpartition(":")
        summary = read_run(run)
        if method not in summary["methods"]:
            raise SystemExit(f"--compare: {run} has no method {method!r} (it has {', '.join(summary['methods'])})")
        runs.append((summary, summary["methods"][method]))
    (a, ra), (b, rb) = runs
    if (a["concepts"], a["images"]) != (b["concepts"], b["images"]):
        raise SystemExit("--compare: the runs differ in their concepts or identity images; only like for like compares.")
    return f"{specs[0]} − {specs[1]}: identity accuracy {identity_gaps(ra['identity'], rb['identity'], a['images'])}"


def identity_gaps(a, b, n: int) -> str:
    """Per-concept identity differences a − b in points, each with the 95% sampling interval of n images."""
    a, b = np.array(a), np.array(b)
    gaps = 100 * (a - b)
    noise = 100 * 1.96 * np.sqrt((a * (1 - a) + b * (1 - b)) / n)  # 95% interval of a difference of two rates
    return (f"{gaps.mean():+.0f} points on average; per concept {(abs(gaps) <= 5).sum()} of {len(gaps)} within 5 points, "
            f"{(abs(gaps) <= noise).sum()} within their 95% sampling interval at {n} images each (differences "
            f"{', '.join(f'{g:+.0f}±{h:.0f}' for g, h in zip(gaps, noise))}).")


def hardware() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "unknown CPU")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def table(summary: dict) -> str:
    m = summary["methods"]
    ref = m.get("lora", {})
    rows = ["| method | avg score | forgetting | backward transfer | identity acc. | drift | bytes / concept | trainable params | wall time |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for name, r in m.items():
        ratio = f" ({ref['bytes_per_concept'] / r['bytes_per_concept']:.0f}× smaller)" if ref and name == "share" else ""
        rows.append(f"| {name} | {f(r['average_score'])} | {f(r.get('forgetting'))} | {f(r.get('backward_transfer'))} | "
                    f"{f(r['identity_mean'], 2)} | {f(r['drift'], 4)} | {r['bytes_per_concept']:,.0f}{ratio} | {r['trainable_params']:,} | "
                    f"{r['wall_s']:.0f} s |")
    notes = []
    if "share" in m and ref:
        s = m["share"]
        notes.append(f"Share / independent LoRA: average score {s['average_score'] / ref['average_score']:.2f}×, "
                     f"identity accuracy {identity_gaps(s['identity'], ref['identity'], summary['images'])}")
    return "\n".join(rows + [""] + notes) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    T = len(summary["concepts"])
    for ax, (name, r) in zip(axes[0], methods.items()):
        R = np.array(r["R"], dtype=float)
        for j in range(T):
            if name == "joint":
                ax.plot([T - 1], [R[-1, j]], "o")
            else:
                ax.plot(range(j, T), R[j:, j], marker=".", label=summary["concepts"][j] if name == "share" else None)
        ax.set_title(f"{name}: avg {r['average_score']:.2f}" + (f", forgetting {r['forgetting']:.3f}" if "forgetting" in r else ""))
        ax.set_xlabel("concepts learned")
        ax.axhline(1.0, color="grey", lw=0.5, ls="--")
        ax.set_xticks(range(T))
        ax.set_xticklabels(range(1, T + 1))
    axes[0][0].set_ylabel("normalised held-out score")
    fig.legend(loc="lower center", ncol=min(T, 5), fontsize=7, bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
