#!/usr/bin/env python
"""Continual benchmark: concepts of the procedural world learned one after another, Share against
the strict-continual peers and the references, all run by this script with the same data, steps,
loss and tuning effort.

Methods (`share_lab.baselines` holds the peers' mechanisms)
- ``share``      ``train/learn_concept.py`` per concept into one Share file (the real product path)
- ``naive``      ONE LoRA fine-tuned on concept after concept
- ``merge``      consecutive merging: each concept's fresh LoRA merged into the weights (2410.04891)
- ``ortho``      orthogonally initialised LoRAs, their factors summed into one adapter (2410.04891)
- ``magnitude``  magnitude-selected merging of each concept's update (2410.04891)
- ``clora``      C-LoRA's self-regularisation against the earlier concepts' updates (2304.06027)
- ``lora``       an independent LoRA per concept (rank 4, same layers): not strict, one file per
                 concept, no forgetting by construction — the quality reference (score 1)
- ``joint``      one LoRA trained on all concepts' data at once (not continual), evaluated at the end

Scores: R[i, j] = normalised held-out score on concept j after learning concept i (0 = the base
model, 1 = the concept's stored reference LoRA, or for concepts without one the independent LoRA of
the same run: the same recipe); held-out losses are kept raw (``R_loss``) and normalised when the
table is written.
From R: average score, forgetting, backward transfer, and their curves against the number of
concepts learned. In the final state: discriminative identity (`evaluation.discriminative_identity`,
no generation; for Share also with each concept as it was when learned, from ``share/history/``: the
identity forgetting), identity accuracy of generated images (the world's classifier, ``--images``), drift
on prompts without a concept, bytes stored per concept, trainable parameters and wall time.
Share is also scored with every concept active at once, each picked by its trigger only, the test
the merged-model peers take. Output: JSON, a markdown table and two PNG plots in ``--out``.

Every method keeps a checkpoint and its results in ``--out/<method>/`` after each concept: a run
that is stopped continues where it was when started again with the same command, and a finished
one grows: the same command with more concepts, their list starting with the run's (``--concepts_dir``
takes several folders, in order), learns only the new ones.

    python benchmarks/continual.py                 # 10 shipped concepts, every method (CPU: hours)
    python benchmarks/continual.py --quick         # 2 concepts, few steps: a smoke test
    # 50 concepts of the world, in two processes (one per CPU core), then one table and plot:
    python train/make_concepts.py --count 50 --output runs/concepts50
    OMP_NUM_THREADS=1 python benchmarks/continual.py --concepts_dir runs/concepts50 --concepts 50 \\
        --methods share lora --lr share=1e-2 lora=1e-3 --out runs/c50a &
    OMP_NUM_THREADS=1 python benchmarks/continual.py --concepts_dir runs/concepts50 --concepts 50 \\
        --methods naive merge --lr lora=1e-3 --out runs/c50b; wait
    python benchmarks/continual.py --combine runs/c50a runs/c50b --out runs/c50
    # runs of different settings side by side (average score and forgetting against N):
    python benchmarks/continual.py --curves runs/k8:share=k8 runs/k16:share=k16 --out runs/k
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import share_diffusers  # noqa: F401
import share_lab
from share_diffusers import read_share
from share_diffusers.training import read_instance_images
from share_lab import baselines, evaluation, world

ROOT = share_lab.ROOT

METHODS = ("share", "naive", "merge", "ortho", "magnitude", "clora", "lora", "joint")
STRICT = ("share", "naive", "merge", "ortho", "magnitude", "clora")  # only the model or one adapter passes on
LR_FAMILY = {m: "share" if m == "share" else "lora" for m in METHODS}  # one tuned learning rate per family


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default=str(share_lab.TINY_BASE))
    p.add_argument("--concepts", type=int, default=10, help="how many, in the order of --concepts_dir")
    p.add_argument("--concepts_dir", nargs="+", default=[str(share_lab.CONCEPTS)],
                   help="folders of concept folders (train/make_concepts.py), taken in the order given, each in name order")
    p.add_argument("--steps", type=int, default=baselines.RECIPE_STEPS, help="training steps per concept, every method")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--heldout_images", type=int, default=20, help="held-out images per concept for the score")
    p.add_argument("--lora_rank", type=int, default=4)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="learning rates tried on the first concept, per family")
    p.add_argument("--lr", nargs="+", default=[], metavar="FAMILY=LR",
                   help="skip tuning: e.g. share=1e-2 lora=1e-3 (lora sets every LoRA-based method)")
    p.add_argument("--clora_weight", type=float, default=1.0,
                   help="λ of C-LoRA's forgetting loss (1: two trained concepts' overlap ‖ΔW_1 ⊙ ΔW_2‖² ≈ 0.1 costs about the denoising loss)")
    p.add_argument("--eval_every", type=int, default=1,
                   help="score every learned concept after every N-th concept (the new one after each, always)")
    p.add_argument("--identity_concepts", type=int, default=12,
                   help="discriminative identity among this many concepts, evenly spread (0: skip)")
    p.add_argument("--identity_images", type=int, default=20, help="held-out images per concept for discriminative identity")
    p.add_argument("--images", type=int, default=100,
                   help="generated images per concept for identity accuracy (its held-out prompts, cycled with new seeds; 0: skip)")
    p.add_argument("--classifier", default=str(share_lab.CLASSIFIER),
                   help="identity classifier of generated images (a folder; world v2: the parts reader)")
    p.add_argument("--sample_steps", type=int, default=evaluation.DEFAULT_STEPS, help="sampling steps of generated images (identity, drift)")
    p.add_argument("--drift_prompts", type=int, default=8, help="prompts without a concept for drift")
    p.add_argument("--share_args", default="", help="extra flags for learn_concept.py (e.g. '--basis_rank 8')")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--references", nargs="+", metavar="RUN",
                   help="score 1 = the independent LoRAs of these other runs (their --out or continual.json) for concepts without a stored reference")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="no training: merge runs of different methods (their --out or continual.json; e.g. run in parallel) into --out")
    p.add_argument("--compare", nargs=2, metavar="RUN:METHOD",
                   help="no training: per-concept identity of two finished runs (their --out or continual.json), "
                        "e.g. runs/a:lora runs/b:lora where b ran with another --seed")
    p.add_argument("--curves", nargs="+", metavar="RUN:METHOD[=LABEL]",
                   help="no training: average score and forgetting against the number of concepts, of methods of finished "
                        "runs whose settings may differ (e.g. --share_args '--basis_rank 8' / 16 / 32), in one plot in --out")
    p.add_argument("--quick", action="store_true", help="2 concepts, 10 steps, one learning rate, few images of few steps")
    args = p.parse_args(argv)
    try:
        args.lr = {family: float(lr) for family, lr in (item.split("=") for item in args.lr)}
    except ValueError:
        p.error(f"--lr takes FAMILY=LR pairs such as share=3e-3, got {args.lr}")
    if set(args.lr) - {"share", "lora"}:
        p.error(f"--lr families are share and lora, got {sorted(args.lr)}")
    if args.eval_every < 1:
        p.error(f"--eval_every must be ≥ 1, got {args.eval_every}")
    if args.quick:
        args.concepts, args.steps, args.lrs = 2, 10, args.lrs[:1]
        args.images, args.identity_images, args.heldout_images, args.sample_steps, args.drift_prompts = 2, 2, 4, 4, 2
    return args


def load_base(path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def concept_loss(pipe, concept: world.ConceptFolder, images: int) -> float:
    heldout = concept.heldout[:images]
    return evaluation.heldout_loss(pipe, [s.image for s in heldout], [s.caption for s in heldout])


# -- the learners -----------------------------------------------------------------------------------
#
# A learner owns a pipeline and learns concept after concept on it. `learn(i, ...)` ends with what
# passes to the next concept saved under `folder` (`checkpoint(i + 1)`: a stop before the progress
# is written leaves the previous checkpoint usable); `restore` rebuilds that state after a restart.


class Learner:
    frozen = False  # True when a learned concept's adapter never changes again (its score cannot move)

    def __init__(self, args, lr: float, folder: Path):
        self.args, self.lr, self.folder = args, lr, folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pipe = load_base(args.base)
        self.unet = self.pipe.unet

    def learn(self, i: int, concept: world.ConceptFolder) -> None:
        raise NotImplementedError

    def restore(self, concepts: list[world.ConceptFolder]) -> None:
        raise NotImplementedError

    def select(self, j: int) -> None:
        """Make concept j the active one (one merged model: its trigger word does it)."""

    def checkpoint(self, learned: int) -> Path:
        return self.folder / f"after-{learned:03d}.safetensors"

    def train(self, adapter: str, concepts, steps=None, penalty=None) -> None:
        examples = [ex for c in concepts for ex in read_instance_images(c.path / "train", None)]
        baselines.train_lora_baseline(self.pipe, adapter, examples, steps or self.args.steps, self.lr,
                                      self.args.batch_size, self.args.lora_rank, self.args.seed, penalty=penalty)

    def lora_params(self, adapter: str) -> int:
        return sum(p.numel() for n, p in self.unet.named_parameters() if f".{adapter}." in n and "lora_" in n)

    def stats(self, T: int) -> dict:
        raise NotImplementedError


class ShareLearner(Learner):
    def __init__(self, args, lr, folder):
        super().__init__(args, lr, folder)
        self.file, self.history = folder / "share.safetensors", folder / "history"
        self.names: list[str] = []

    def learn(self, i, concept):
        if not self.file.exists() or concept.name not in read_share(self.file)[0].names:  # else: written before a stop
            cmd = [sys.executable, str(ROOT / "train" / "learn_concept.py"), "--pretrained_model_name_or_path", self.args.base,
                   "--instance_data_dir", str(concept.path / "train"), "--share_path", str(self.file),
                   "--concept_name", concept.name, "--output_dir", str(self.folder / "runs" / concept.name),
                   "--max_train_steps", str(self.args.steps), "--train_batch_size", str(self.args.batch_size),
                   "--learning_rate", str(self.lr), "--center_crop", "--report_to", "none", "--num_validation_images", "1",
                   "--num_heldout_images", "0",  # held-out losses are this benchmark's own measurement
                   "--target_modules", *baselines.LORA_TARGETS, "--seed", str(self.args.seed), *self.args.share_args.split()]
            result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if result.returncode:
                raise RuntimeError(f"learn_concept.py failed on {concept.name}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        self.history.mkdir(exist_ok=True)  # the state after every concept, for measures made afterwards
        shutil.copyfile(self.file, self.after(i))
        self.restore([])

    def restore(self, concepts):
        if self.file.exists():
            self.pipe.unload_share()
            self.pipe.load_share(self.file)
            self.names = read_share(self.file)[0].names

    def select(self, j):
        self.pipe.set_share_concepts(self.names[j])

    def select_all(self) -> None:
        self.pipe.set_share_concepts({name: 1.0 for name in self.names})

    def after(self, j: int) -> Path:
        """The Share file as it was right after concept j was learned (a run grown from one made
        before the history was kept lacks it for the first concepts)."""
        return self.history / f"after-{j + 1:03d}.safetensors"

    def select_when_learned(self, j: int) -> None:
        """Concept j as it was right after it was learned (its state in the history), before later merges."""
        self.pipe.unload_share()
        self.pipe.load_share(self.after(j))
        self.pipe.set_share_concepts(self.names[j])

    def stats(self, T):
        state, header = read_share(self.file)
        p = {c["name"]: c["p"] for c in header["concepts"]}
        coef_bytes = sum(4 * 2 * layer.k * p[state.names[-1]] for layer in state.layers.values())
        ks = [layer.k for layer in state.layers.values()]
        flags = self.args.share_args.split()
        get = lambda flag, default: int(flags[flags.index(flag) + 1]) if flag in flags else default  # noqa: E731
        phi = get("--num_extra_directions", 2)
        trainable = sum(2 * layer.k * p[state.names[-1]] + phi * (n + d) + 2 * phi * p[state.names[-1]]
                        for layer in state.layers.values() for n, d in [layer.shape])
        return {"bytes_per_concept": coef_bytes, "bytes_per_concept_with_basis": self.file.stat().st_size / T,
                "file_bytes": self.file.stat().st_size, "trainable_params": trainable, "k": [min(ks), max(ks)],
                "merge_errors": {c["name"]: c["merge_errors"] for c in state.concepts}}


class IndependentLoras(Learner):
    frozen = True

    def adapter_file(self, i: int) -> Path:
        return self.folder / "adapters" / f"c{i}.safetensors"

    def learn(self, i, concept):
        self.train(f"c{i}", [concept])
        self.adapter_file(i).parent.mkdir(exist_ok=True)
        save_file(get_peft_model_state_dict(self.unet, adapter_name=f"c{i}"), self.adapter_file(i))

    def restore(self, concepts):
        for i in range(len(concepts)):
            baselines.add_lora(self.unet, f"c{i}", self.args.lora_rank, self.args.seed)
            set_peft_model_state_dict(self.unet, load_file(self.adapter_file(i)), adapter_name=f"c{i}")

    def select(self, j):
        self.unet.set_adapters([f"c{j}"])

    def stats(self, T):
        n = self.lora_params("c0")
        return {"bytes_per_concept": 4 * n, "trainable_params": n}


class NaiveLora(Learner):
    """One LoRA, trained further on each new concept."""

    def learn(self, i, concept):
        self.train("seq", [concept])
        save_file(get_peft_model_state_dict(self.unet, adapter_name="seq"), self.checkpoint(i + 1))

    def restore(self, concepts):
        if concepts:
            baselines.add_lora(self.unet, "seq", self.args.lora_rank, self.args.seed)
            set_peft_model_state_dict(self.unet, load_file(self.checkpoint(len(concepts))), adapter_name="seq")

    def stats(self, T):
        n = self.lora_params("seq")
        return {"bytes_per_concept": 4 * n / T, "trainable_params": n}


class MergedLoras(Learner):
    """Consecutive merging: a fresh LoRA per concept, its update B A added into the weights. What
    passes on is the merged model; its difference from the base (`self.tau`, dense) is the checkpoint."""

    def __init__(self, args, lr, folder):
        super().__init__(args, lr, folder)
        self.tau: dict[str, torch.Tensor] = {}

    def learn(self, i, concept):
        baselines.add_lora(self.unet, "new", self.args.lora_rank, self.args.seed + i)
        self.train("new", [concept], penalty=self.penalty())
        self.merge(baselines.lora_deltas(self.unet, "new"))
        self.unet.delete_adapters("new")
        save_file(self.tau, self.checkpoint(i + 1))

    def penalty(self):
        return None

    def merge(self, delta: dict[str, torch.Tensor]) -> None:
        baselines.add_to_weights(self.unet, delta)
        self.tau = {n: self.tau.get(n, 0) + d for n, d in delta.items()}

    def restore(self, concepts):
        if concepts:
            self.tau = load_file(self.checkpoint(len(concepts)))
            baselines.add_to_weights(self.unet, self.tau)

    def stats(self, T):
        dense = sum(t.numel() for t in self.tau.values())
        return {"bytes_per_concept": 4 * dense / T, "trainable_params": self.lora_params_of_rank()}

    def lora_params_of_rank(self) -> int:
        r = self.args.lora_rank
        return sum(r * (len(t) + t[0].numel()) for t in self.tau.values())  # B: out x r, A: r x in (a conv's: its patch)


class MagnitudeMerge(MergedLoras):
    """Entry by entry, the larger of the old task vector and the new update is kept."""

    def merge(self, delta):
        baselines.add_to_weights(self.unet, self.tau, sign=-1.0)  # back to W_0
        self.tau = {n: baselines.magnitude_merge(self.tau[n], d) if n in self.tau else d for n, d in delta.items()}
        baselines.add_to_weights(self.unet, self.tau)


class CLora(MergedLoras):
    """The new LoRA's loss penalises changing what earlier concepts changed (their summed update)."""

    def penalty(self):
        return baselines.clora_penalty(self.unet, "new", self.tau, self.args.clora_weight) if self.tau else None


class OrthogonalLoras(Learner):
    """One adapter of summed factors (ΣB, ΣA), fused while the next concept trains; each new A is
    orthogonal, column by column, to ΣA."""

    def __init__(self, args, lr, folder):
        super().__init__(args, lr, folder)
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def learn(self, i, concept):  # the weights hold W_0 + ΣB ΣA of the concepts before i
        previous = self.sums
        baselines.add_lora(self.unet, "new", self.args.lora_rank, self.args.seed + i)
        if previous:
            baselines.orthogonal_init(self.unet, "new", {n: a for n, (a, _) in previous.items()})
        self.train("new", [concept])
        new = {n: (m.lora_A["new"].weight.detach().clone(), m.lora_B["new"].weight.detach().clone())
               for n, m in baselines.lora_layers(self.unet, "new").items()}
        self.unet.delete_adapters("new")
        if previous:
            self.fuse(previous, -1.0)
            new = {n: (a + previous[n][0], b + previous[n][1]) for n, (a, b) in new.items()}
        self.fuse(new, +1.0)
        self.sums = new
        save_file({f"{n}.{side}": t for n, ab in new.items() for side, t in zip("AB", ab)}, self.checkpoint(i + 1))

    def fuse(self, factors, sign: float) -> None:
        deltas = {n: (b.flatten(1) @ a.flatten(1)).view(len(b), *a.shape[1:])  # a conv's A: r x in x kh x kw
                  for n, (a, b) in factors.items()}
        baselines.add_to_weights(self.unet, deltas, sign)  # lora_alpha = rank: scale 1

    def restore(self, concepts):
        if concepts:
            flat = load_file(self.checkpoint(len(concepts)))
            self.sums = {n[:-2]: (flat[n], flat[n[:-1] + "B"]) for n in flat if n.endswith(".A")}
            self.fuse(self.sums, +1.0)

    def stats(self, T):
        n = sum(a.numel() + b.numel() for a, b in self.sums.values())
        return {"bytes_per_concept": 4 * n / T, "trainable_params": n}


class JointLora(Learner):
    """Not continual: one LoRA on every concept's data at once (steps × concepts), after the last."""

    def __init__(self, args, lr, folder):
        super().__init__(args, lr, folder)
        self.seen: list[world.ConceptFolder] = []

    def learn(self, i, concept):
        self.seen.append(concept)
        if len(self.seen) == self.args.concepts:
            self.train("joint", self.seen, steps=self.args.steps * self.args.concepts)
            save_file(get_peft_model_state_dict(self.unet, adapter_name="joint"), self.checkpoint(self.args.concepts))

    def restore(self, concepts):
        self.seen = list(concepts)
        if len(concepts) == self.args.concepts:
            baselines.add_lora(self.unet, "joint", self.args.lora_rank, self.args.seed)
            set_peft_model_state_dict(self.unet, load_file(self.checkpoint(self.args.concepts)), adapter_name="joint")

    def stats(self, T):
        n = self.lora_params("joint")
        return {"bytes_per_concept": 4 * n / T, "trainable_params": n}


LEARNERS = {"share": ShareLearner, "naive": NaiveLora, "merge": MergedLoras, "ortho": OrthogonalLoras,
            "magnitude": MagnitudeMerge, "clora": CLora, "lora": IndependentLoras, "joint": JointLora}


# -- running a method, resumably -------------------------------------------------------------------


def settings(args, concepts) -> dict:
    """What a run's results depend on: a restart must have the same."""
    return {"concepts": [c.name for c in concepts], "steps": args.steps, "batch_size": args.batch_size, "heldout_images": args.heldout_images,
            "lora_rank": args.lora_rank, "targets": baselines.LORA_TARGETS, "share_args": args.share_args, "seed": args.seed,
            "base": args.base}


def rows_to_score(method: str, i: int, T: int, eval_every: int) -> list[int]:
    """Which concepts are scored after learning concept i."""
    if method == "joint":
        return list(range(T)) if i == T - 1 else []
    if method == "lora":
        return [i]  # the others' adapters are untouched: their scores are copied, not re-measured
    full = (i + 1) % eval_every == 0 or i == T - 1
    return list(range(i + 1)) if full else [i]


def run_method(method: str, args, concepts, lr: float, folder: Path, drift_references) -> dict:
    """Learn every concept in turn (continuing a stopped run), scoring after each; then the final
    state's metrics. Progress is written to ``folder/progress.json`` after every concept."""
    T = len(concepts)
    learner = LEARNERS[method](args, lr, folder)
    progress_file = folder / "progress.json"
    expected = dict(settings(args, concepts), lr=lr)
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {"settings": expected, "R_loss": [], "wall_s": []}
    if progress["settings"] != expected:
        progress = grown(progress, expected, folder, method)
    done = len(progress["R_loss"])
    if done:
        print(f"  {method}: continuing after {done} of {T} concepts")
        learner.restore(concepts[:done])
    for i in range(done, T):
        started = time.time()
        learner.learn(i, concepts[i])
        wall = time.time() - started
        row = [None] * T
        for j in rows_to_score(method, i, T, args.eval_every):
            learner.select(j)
            row[j] = concept_loss(learner.pipe, concepts[j], args.heldout_images)
        if learner.frozen:
            row[:i] = [progress["R_loss"][j][j] for j in range(i)]
        progress["R_loss"].append(row)
        progress["wall_s"].append(wall)
        write_json(progress_file, progress)
        for old in folder.glob("after-*.safetensors"):
            if old != learner.checkpoint(i + 1) and old != learner.checkpoint(T):
                old.unlink()
        print(f"  {method}: {i + 1}/{T} {concepts[i].name} ({wall:.0f} s)", flush=True)
    if "final" not in progress:
        progress["final"] = final_metrics(method, learner, concepts, args, drift_references)
        write_json(progress_file, progress)
    return {"lr": lr, "R_loss": progress["R_loss"], "wall_s": float(sum(progress["wall_s"])), **progress["final"]}


def grown(progress: dict, expected: dict, folder: Path, method: str) -> dict:
    """A run continued to more concepts: the same settings, its concepts the first of the new list.
    Its rows are kept (the new concepts' columns empty until measured), its final metrics kept under
    ``final_at``; any other difference is refused."""
    before, after = progress["settings"]["concepts"], expected["concepts"]
    if {**progress["settings"], "concepts": after} != expected or after[: len(before)] != before or len(after) <= len(before):
        raise SystemExit(f"{folder} holds a {method} run with other settings; give another --out or remove it.")
    print(f"  {method}: growing the {len(before)}-concept run in {folder} to {len(after)} concepts")
    finals = progress.get("final_at", {})
    if "final" in progress:
        finals[str(len(before))] = progress["final"]
    return {**{k: v for k, v in progress.items() if k != "final"}, "settings": expected, "final_at": finals,
            "R_loss": [row + [None] * (len(after) - len(before)) for row in progress["R_loss"]]}


def final_metrics(method: str, learner: Learner, concepts, args, drift_references) -> dict:
    """Identity (discriminative, and of generated images), drift and storage, in the final state."""
    out = learner.stats(len(concepts))
    if args.identity_concepts:
        picked = np.unique(np.linspace(0, len(concepts) - 1, min(args.identity_concepts, len(concepts))).round().astype(int))
        identity = lambda select: evaluation.discriminative_identity(  # noqa: E731
            learner.pipe, [concepts[j] for j in picked], lambda c: select(int(picked[c])), args.identity_images)
        out["discriminative"] = dict(identity(learner.select), concepts=picked.tolist())
        if method == "share" and all(learner.after(j).exists() for j in picked):
            # identity forgetting: the same test with each concept as it was when learned
            out["discriminative_when_learned"] = identity(learner.select_when_learned)
            learner.restore(concepts)
    if args.images:
        classifier = evaluation.load_identity_classifier(args.classifier)
        out["identity"] = []
        for j, c in enumerate(concepts):
            learner.select(j)
            out["identity"].append(evaluation.generation_metrics(learner.pipe, c, classifier, n=args.images, seed=args.seed,
                                                                 steps=args.sample_steps)["identity"])
    learner.select(len(concepts) - 1)  # the last concept active on prompts that do not mention it
    out["drift"] = evaluation.drift(learner.pipe, *drift_references, seed=args.seed, steps=args.sample_steps)
    if method == "share":  # every concept active at once, each picked by its trigger only
        learner.select_all()
        out["all_active_loss"] = [concept_loss(learner.pipe, c, args.heldout_images) for c in concepts]
    return out


def tune(args, concept, out: Path) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """The same learning-rate sweep for Share and for LoRA, on the first concept only: the rate
    with the lowest held-out loss per family, and every loss of the sweep."""
    best, sweeps = dict(args.lr), {}
    for family in sorted({LR_FAMILY[m] for m in args.methods} - set(args.lr)):
        if len(args.lrs) == 1:
            best[family] = args.lrs[0]
            continue
        method = "share" if family == "share" else "lora"
        losses = {}
        for lr in args.lrs:
            learner = LEARNERS[method](args, lr, out / f"tune-{method}-{lr:g}")
            learner.learn(0, concept)
            learner.select(0)
            losses[lr] = concept_loss(learner.pipe, concept, args.heldout_images)
        best[family], sweeps[family] = min(losses, key=losses.get), losses
        print(f"tuning {family}: " + ", ".join(f"lr {lr:g} → loss {s:.5f}" for lr, s in losses.items()) + f"; using {best[family]:g}")
    return best, sweeps


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return write_results(combine([read_run(run) for run in args.combine]), out)
    if args.compare:
        print(compare(args.compare))
        return {}
    if args.curves:
        runs = {label or spec: method_of(spec)[1] for spec, _, label in (item.partition("=") for item in args.curves)}
        plot_curves({"methods": runs}, out / "continual-curves.png")
        print(f"wrote {out / 'continual-curves.png'}")
        return runs
    concepts = [c for folder in args.concepts_dir for c in world.list_concepts(folder)]
    repeated = sorted(name for name, n in Counter(c.name for c in concepts).items() if n > 1)
    if repeated:
        raise SystemExit(f"--concepts_dir: {', '.join(repeated)} found more than once in {' '.join(args.concepts_dir)}")
    concepts = concepts[: args.concepts]
    if len(concepts) < args.concepts:
        raise SystemExit(f"--concepts {args.concepts}, but {' '.join(args.concepts_dir)} hold {len(concepts)} concept folders "
                         f"(make more with: python train/make_concepts.py --count {args.concepts} --output DIR)")
    references = reference_losses(concepts, args.references)
    missing = [c.name for c, r in zip(concepts, references) if r is None]
    if missing and "lora" not in args.methods:
        if not args.references:
            raise SystemExit(f"no reference loss (score 1) for {len(missing)} concepts ({', '.join(missing[:3])}, …): "
                             "add --methods lora, or take them from another run's with --references RUN")
        # e.g. the named independent-LoRA run is still going: this run's raw losses are kept, and the same command
        # run again once it has finished scores them (a finished run only re-scores)
        print(f"warning: --references has no loss yet for {len(missing)} concepts ({', '.join(missing[:3])}, …); their scores stay "
              "empty until this command is run again after the reference run has them", flush=True)
    base_losses = cached(out / "base_losses.json", settings(args, concepts),
                         lambda: [concept_loss(load_base(args.base), c, args.heldout_images) for c in concepts])
    lrs, sweeps = cached(out / "learning_rates.json", dict(settings(args, concepts), lrs=args.lrs, lr=args.lr),
                         lambda: tune(args, concepts[0], out))
    prompts = evaluation.no_concept_prompts(args.drift_prompts, args.seed)
    drift_references = (prompts, evaluation.generate(load_base(args.base), prompts, args.seed, steps=args.sample_steps))
    results = {}
    for method in args.methods:
        print(f"== {method} (lr {lrs[LR_FAMILY[method]]:g})")
        results[method] = run_method(method, args, concepts, lrs[LR_FAMILY[method]], out / method, drift_references)
    references = reference_losses(concepts, args.references)  # again: the reference run may have finished meanwhile
    if None in references and "lora" not in args.methods:
        raise SystemExit(f"every concept is learned and measured (kept in {out}), but --references still has no loss for "
                         f"{references.count(None)} concepts: run this command again once the reference run has them.")
    summary = {**settings(args, concepts), "images": args.images, "identity_images": args.identity_images, "eval_every": args.eval_every,
               "sample_steps": args.sample_steps, "drift_prompts": args.drift_prompts,
               "base_losses": base_losses, "stored_reference_losses": references,
               "lr_sweeps": sweeps, "methods": results, "hardware": hardware(),
               "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}
    return write_results(summary, out)


def reference_losses(concepts, other_runs: list[str] | None) -> list[float | None]:
    """Each concept's stored reference loss, else the loss of its independent LoRA in one of ``other_runs``."""
    measured = {}
    for run in other_runs or []:
        if Path(run).is_file():  # a finished run's continual.json (e.g. one in docs/results)
            summary = read_run(run)
            if "lora" not in summary["methods"]:
                raise SystemExit(f"--references: {run} has no independent-LoRA results")
            names, losses = summary["concepts"], summary["methods"]["lora"]["R_loss"]
        else:
            progress_file = Path(run) / "lora" / "progress.json"
            if not progress_file.is_file():
                raise SystemExit(f"--references: {run} has no independent-LoRA run ({progress_file} is missing)")
            progress = json.loads(progress_file.read_text())
            names, losses = progress["settings"]["concepts"], progress["R_loss"]
        measured |= {name: row[i] for i, (name, row) in enumerate(zip(names, losses))}
    return [c.metadata.get("evaluation", {}).get("reference_loss", measured.get(c.name)) for c in concepts]


def cached(path: Path, key: dict, compute):
    """compute(), stored in ``path`` with the settings it depends on, and read back on a restart."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value


def write_json(path: Path, value) -> None:
    """Whole or not at all: a stop mid-write leaves the previous version."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=float))
    os.replace(tmp, path)


# -- results ------------------------------------------------------------------------------------------


def scored(summary: dict) -> dict:
    """The summary with every method's R, metrics and curves from its raw losses, normalised by the
    base losses and the concepts' stored reference losses (the shipped concepts'), or where some
    concept has none, by the run's own independent LoRAs (the same recipe)."""
    methods = summary["methods"]
    base = np.array(summary["base_losses"], dtype=float)
    stored = summary["stored_reference_losses"]
    if None not in stored or "lora" not in methods:
        reference = np.array([np.nan if r is None else r for r in stored], dtype=float)
    else:
        reference = np.diag(np.array(methods["lora"]["R_loss"], dtype=float))
    score = lambda loss: (base - np.array(loss, dtype=float)) / (base - reference)  # noqa: E731
    for name, r in methods.items():
        R = score(r["R_loss"])
        r["R"] = R.tolist()
        if name == "joint":
            r["average_score"] = float(np.mean(R[-1]))
        else:
            r.update(evaluation.continual_metrics(R), curves=evaluation.continual_curves(R))
        if "all_active_loss" in r:
            r["all_active_score"] = float(np.mean(score(r["all_active_loss"])))
        if "discriminative_when_learned" in r:
            r["identity_forgetting"] = r["discriminative_when_learned"]["accuracy"] - r["discriminative"]["accuracy"]
    return summary


def write_results(summary: dict, out: Path) -> dict:
    summary = scored(summary)
    write_json(out / "continual.json", summary)
    (out / "continual.md").write_text(table(summary))
    plot(summary, out / "continual.png")
    plot_curves(summary, out / "continual-curves.png")
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
    same = ("concepts", "steps", "batch_size", "images", "lora_rank", "targets", "share_args", "base_losses")
    for part in parts[1:]:
        differ = [k for k in same if part.get(k) != parts[0].get(k)]
        if differ:
            raise SystemExit(f"--combine: the runs differ in {', '.join(differ)}; only runs of one setting combine.")
    summary = dict(parts[0], methods={}, lr_sweeps={}, command=[p["command"] for p in parts])
    for part in parts:
        summary["methods"].update(part["methods"])
        summary["lr_sweeps"].update(part["lr_sweeps"])
    return summary


def method_of(spec: str) -> tuple[dict, dict]:
    """A finished run's summary and one method's results, from ``RUN:METHOD`` (RUN: --out or its continual.json)."""
    run, _, method = spec.rpartition(":")
    summary = read_run(run)
    if method not in summary["methods"]:
        raise SystemExit(f"{spec}: {run} has no method {method!r} (it has {', '.join(summary['methods'])})")
    return summary, summary["methods"][method]


def compare(specs: list[str]) -> str:
    """Identity of method A in run A against method B in run B, concept by concept."""
    (a, ra), (b, rb) = (method_of(spec) for spec in specs)
    if (a["concepts"], a["images"]) != (b["concepts"], b["images"]) or "identity" not in ra or "identity" not in rb:
        raise SystemExit("--compare: the runs differ in their concepts or identity images; only like for like compares.")
    return f"{specs[0]} − {specs[1]}: identity accuracy {evaluation.identity_gaps(ra['identity'], rb['identity'], a['images'])}"


def hardware() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "unknown CPU")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def table(summary: dict) -> str:
    m = summary["methods"]
    ref = m.get("lora", {})
    rows = ["| method | avg score | forgetting | backward transfer | discriminative identity | identity acc. [95 %] | drift | "
            "bytes / concept | trainable params | wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=3: "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"  # noqa: E731
    for name, r in m.items():
        ratio = f" ({ref['bytes_per_concept'] / r['bytes_per_concept']:.0f}× smaller)" if ref and name == "share" else ""
        identity = "–"
        if r.get("identity"):  # every concept's images pooled: the interval sampling leaves open
            n = len(r["identity"]) * summary["images"]
            low, high = evaluation.wilson_interval(round(np.mean(r["identity"]) * n), n)
            identity = f"{np.mean(r['identity']):.2f} [{low:.2f}, {high:.2f}]"
        rows.append(f"| {name} | {f(r['average_score'])} | {f(r.get('forgetting'))} | {f(r.get('backward_transfer'))} | "
                    f"{f(r.get('discriminative', {}).get('accuracy'), 2)} | {identity} | {f(r['drift'], 4)} | "
                    f"{r['bytes_per_concept']:,.0f}{ratio} | {r['trainable_params']:,} | {r['wall_s']:.0f} s |")
    notes = []
    if "share" in m:
        s = m["share"]
        notes.append(f"Share with every concept active at once, each picked by its trigger: average score {f(s['all_active_score'])} "
                     f"(k = {s['k'][0]}–{s['k'][1]} per layer; {s['bytes_per_concept_with_basis']:,.0f} bytes per concept with the basis).")
        if "identity_forgetting" in s:
            notes.append(f"Share's identity forgetting: discriminative identity {f(s['discriminative_when_learned']['accuracy'], 2)} with each "
                         f"concept as it was when learned, {f(s['discriminative']['accuracy'], 2)} at the end "
                         f"(forgetting {f(s['identity_forgetting'], 2)}).")
        if ref:
            line = f"Share / independent LoRA: average score {s['average_score'] / ref['average_score']:.2f}×"
            if "identity" in s and "identity" in ref:
                line += f", identity accuracy {evaluation.identity_gaps(s['identity'], ref['identity'], summary['images'])}"
            notes.append(line if line.endswith(".") else line + ".")
    return "\n".join(rows + [""] + notes) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(summary: dict, path: Path) -> None:
    """(a) each concept's score over time, one panel per method."""
    plt = _pyplot()
    methods = summary["methods"]
    T = len(summary["concepts"])
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, T))
    for ax, (name, r) in zip(axes.flat, methods.items()):
        R = np.array(r["R"], dtype=float)
        for j in range(T):
            measured = [i for i in range(j, T) if not np.isnan(R[i, j])]
            ax.plot([i + 1 for i in measured], R[measured, j], marker="." if T <= 12 else None, lw=1, color=colours[j])
        ax.set_title(f"{name}: avg {r['average_score']:.2f}" + (f", forgetting {r['forgetting']:.3f}" if "forgetting" in r else ""), fontsize=9)
        ax.set_xlabel("concepts learned")
        ax.axhline(1.0, color="grey", lw=0.5, ls="--")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("normalised held-out score")
    fig.suptitle("each concept's score as concepts are added (colour: concept, first = dark)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(summary: dict, path: Path) -> None:
    """(b) average score and forgetting against the number of concepts learned, per method."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in summary["methods"].items():
        if "curves" not in r:
            continue
        c = r["curves"]
        left.plot(c["concepts_learned"], c["average_score"], marker=".", label=name)
        right.plot(c["concepts_learned"], c["forgetting"], marker=".", label=name)
    left.set(xlabel="concepts learned", ylabel="average score of the concepts so far")
    right.set(xlabel="concepts learned", ylabel="forgetting")
    left.axhline(1.0, color="grey", lw=0.5, ls="--")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
