"""Share file scale: save_share / read_share time and file size at 1,000 and 10,000 concepts.

Why: version 1 of the file stored one small tensor per concept per layer, so reading and writing
grew with C × L tensors (14 s / 20 s at 1000 concepts in docs/results/systems.md) and every new
concept cost more than the one before. Version 2 stores four stacked tensors per layer. Goals:
≤ 1 s at 1000 concepts and ≤ 10 s at 10,000 on the project's 2-core CPU.

States are synthetic, on the tiny base's layers (names and n × d from the shipped demo Share
file, ``assets/demo.share.safetensors``): k = 16 directions per layer (``--k``),
p = 1 per concept (``--coef_rank`` default), random orthonormal bases and random coefficients,
and per concept the metadata learn_concept.py writes, with a merge-error history of 5 entries.
Timings are the median of ``--repeats`` runs (after one warm-up) of the whole ``save_share`` (lock,
encode, write, fsync, rename) and ``read_share`` (validate, read, hash, build the state), in one
process; the v1 layout (the old writer, ``share_lab/share_v1.py``, read by today's reader) is timed
beside v2 at the sizes in ``--v1``. Writes go to a temporary folder (``--dir`` to choose one).

    python benchmarks/file_scale.py                   # 1,000 and 10,000; v1 at 1,000
    python benchmarks/file_scale.py --out docs/results/file_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import share_lab
from share_diffusers.io import read_share, save_share
from share_diffusers.subspace import ShareState
from share_lab.share_v1 import save_share_v1
from share_lab.tiny_pipelines import synthetic_state

DEMO = share_lab.DEMO_SHARE


def tiny_base_shapes() -> dict[str, tuple[int, int]]:
    """The tiny base's adapted layers, as the shipped demo Share file records them."""
    return read_share(DEMO)[0].shapes


def state_with_metadata(shapes: dict[str, tuple[int, int]], C: int, k: int = 16, p: int = 1, seed: int = 0) -> ShareState:
    """A synthetic state whose concepts carry what learn_concept.py stores for each."""
    layers = synthetic_state(shapes, C, k=k, p=p, seed=seed, scale=0.1).layers
    concepts = [
        {"name": f"concept-{i:05d}", "trigger": f"tok{i:05d}", "prompt": f"a photo of tok{i:05d}", "steps": 400,
         "date": "2026-12-01T10:00:00+00:00", "num_images": 5, "coef_rank": p, "num_extra_directions": 2,
         "merge_errors": [round(1e-8 * j, 8) for j in range(5)], "heldout_loss_base": 0.25,
         "heldout_loss_trained": 0.1, "heldout_loss_merged": 0.1}
        for i in range(C)
    ]
    return ShareState(layers, concepts)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(state: ShareState, path: Path, layout: str, repeats: int) -> dict:
    write = (lambda: save_share(state, path)) if layout == "v2" else (lambda: save_share_v1(state, path))
    save_s = median_time(write, repeats)
    loaded, header = read_share(path)
    assert header["format_version"] == int(layout[1]) and loaded.names == state.names
    for name, layer in state.layers.items():  # what was written is what is read
        assert torch.equal(loaded.layers[name].B, layer.B) and torch.equal(loaded.layers[name].U, layer.U)
    read_s = median_time(lambda: read_share(path), repeats)
    with open(path, "rb") as f:
        tensors = len(json.loads(f.read(int.from_bytes(f.read(8), "little")))) - 1
    return {"layout": layout, "concepts": len(state.concepts), "save_s": round(save_s, 4), "read_s": round(read_s, 4),
            "file_mb": round(path.stat().st_size / 1e6, 3), "tensors": tensors}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--v1", type=int, nargs="*", default=[1000], help="sizes at which to time the v1 layout too")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--p", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    shapes = tiny_base_shapes()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for C in args.concepts:
            state = state_with_metadata(shapes, C, args.k, args.p)
            for layout in ["v1", "v2"] if C in args.v1 else ["v2"]:
                rows.append(measure(state, Path(tmp) / f"{layout}-{C}.safetensors", layout, args.repeats))
                print(f"  {layout} at {C} concepts: save {rows[-1]['save_s']:.3f} s, read {rows[-1]['read_s']:.3f} s",
                      flush=True)
    v1 = {r["concepts"]: r for r in rows if r["layout"] == "v1"}
    print(f"\n{len(shapes)} layers (tiny base), k = {args.k}, p = {args.p}, median of {args.repeats}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print("| concepts | layout | tensors | file MB | save s | read s | v1/v2 save | v1/v2 read |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = ("", "")
        if r["layout"] == "v2" and r["concepts"] in v1:
            old = v1[r["concepts"]]
            ratio = (f"{old['save_s'] / r['save_s']:.1f}×", f"{old['read_s'] / r['read_s']:.1f}×")
            r["v1_over_v2"] = {"save": round(old["save_s"] / r["save_s"], 2), "read": round(old["read_s"] / r["read_s"], 2)}
        print(f"| {r['concepts']:,} | {r['layout']} | {r['tensors']:,} | {r['file_mb']:.2f} | {r['save_s']:.3f} | "
              f"{r['read_s']:.3f} | {ratio[0]} | {ratio[1]} |")
    goals = {1000: 1.0, 10000: 10.0}
    met = {C: all(r[t] <= goals[C] for r in rows if r["layout"] == "v2" and r["concepts"] == C for t in ("save_s", "read_s"))
           for C in goals if any(r["concepts"] == C for r in rows)}
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine)")
    print("goals (v2, save and read each): " + ", ".join(f"≤ {goals[C]:g} s at {C:,}: {'met' if ok else 'NOT met'}"
                                                        for C, ok in met.items()))
    result = {
        "command": "python benchmarks/file_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processor": platform.processor(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()]},
        "setup": {"layers": len(shapes), "k": args.k, "p": args.p, "repeats": args.repeats,
                  "metadata": "learn_concept.py's fields, 5 merge errors per concept"},
        "goals_s": {str(C): g for C, g in goals.items()},
        "goals_met": {str(C): ok for C, ok in met.items()},
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
