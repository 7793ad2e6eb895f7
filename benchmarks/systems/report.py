"""The systems benchmark's report: the environment it ran in, the markdown summary (targets, then
each section's setup and tables) and the plot of switching, merging, inference and training.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.systems.harness import ARCH_NAMES, PHI


def environment(cfg) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), cpu)
    import diffusers
    import peft
    import transformers

    env = dict(
        cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
        torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__,
        device=cfg.device, dtype=cfg.dtype_name, command=" ".join([Path(sys.executable).name, "-m", "benchmarks.systems", *cfg.argv]),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    if cfg.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(cfg.device)
    return env


def fmt(x, digits=3) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# Share systems benchmark", "",
             f"`{env['command']}` — {env['date']}; {env['cpu']}, {env['cores']} cores, {env['torch_threads']} torch threads, "
             f"load average {results['load_before']} before / {results['load_after']} after; torch {env['torch']}, diffusers "
             f"{env['diffusers']}, transformers {env['transformers']}, peft {env['peft']}; device {env['device']}, {env['dtype']}.", "",
             "| section | measure | value | target | met | Share | baseline | note |", "|---|---|---|---|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['section']} | {t['what']} | {fmt(t['value'])} | {t['goal']} | {'✅' if t['met'] else '❌'} | "
                     f"{fmt(t['share']) if t['share'] is not None else ''} | "
                     f"{fmt(t['baseline']) if t['baseline'] is not None else ''} | {t['note']} |")
    for name, sec in results["sections"].items():
        lines += ["", f"## {name}", "", f"*Setup:* {sec.get('setup', '')}", ""]
        for key in ("rows", "rows_overhead", "rows_mixed"):
            rows = sec.get(key)
            if not rows:
                continue
            cols = list(dict.fromkeys(k for row in rows for k in row if k not in ("runs", "steps")))
            lines += [f"| {' | '.join(cols)} |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
            lines.append("")
        if name == "archs":
            for arch, r in sec["results"].items():
                s = r["storage"]
                lines += [f"### {ARCH_NAMES[arch]} ({r['dtype']}{'; ' + r['dtype_note'] if r.get('dtype_note') else ''})", "",
                          f"- parameters (M): {', '.join(f'{c} {v:.0f}' for c, v in r['params_m'].items())}; adapted layers: "
                          f"{', '.join(f'{c} {v}' for c, v in r['adapted_layers'].items())}; built in {r['build_s']:.0f} s",
                          f"- training step (first concept, UNet + text encoders): {', '.join(f'{t:.2f}' for t in r['train_step_s'])} s; "
                          f"{r['trainable']:,} trainable parameters, tensors moved {r['trainable_tensors_moved']}",
                          f"- merge: first concept {r['merge_first_s']:.2f} s, second {r['merge_second_s']:.2f} s; save/load/select ok; "
                          f"fuse {sum(r['fuse_s'].values()):.2f} s, unfuse {sum(r['unfuse_s'].values()):.2f} s, bit-exact {r['unfuse_bit_exact']}; "
                          f"exported LoRA ({r['lora_file_bytes'] / 2**20:.1f} MiB) reproduces the concept's effect on the UNet output to "
                          f"{r['exported_lora_vs_share_rel_to_effect']:.1e} of that effect; text encoder output to "
                          f"{r['exported_lora_text_vs_share_rel_diff']:.1e}",
                          "", "| per concept (UNet + text encoders, fp32) | Share (k=16, p=1) | LoRA r4 | LoRA r16 |", "|---|---|---|---|",
                          f"| stored bytes | {s['share_bytes_per_concept'] / 1024:.1f} KiB "
                          f"(file grows {r['file_bytes_per_concept_measured'] / 1024:.1f} KiB) "
                          f"+ shared basis {s['share_basis_bytes'] / 2**20:.1f} MiB once | {s['lora_r4_bytes'] / 2**20:.1f} MiB | "
                          f"{s['lora_r16_bytes'] / 2**20:.1f} MiB |",
                          f"| trainable parameters | {s['share_trainable_default']:,} (φ={PHI}); {s['share_trainable_phi0']:,} (φ=0) | "
                          f"{s['lora_r4_trainable']:,} | {s['lora_r16_trainable']:,} |", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = results["sections"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    if "switch" in secs:
        s = secs["switch"]
        c = sorted(int(k) for k in s["share_ms"])
        ax.loglog(c, [s["share_ms"][k] for k in c], "o-", label="Share: set_share_concepts")
        n = sorted(int(k) for k in s["lora_ms"])
        ax.loglog(n, [s["lora_ms"][k] for k in n], "s-", label="Diffusers: set_adapters")
        if s.get("hotswap_ms"):
            ax.axhline(s["hotswap_ms"], ls=":", color="gray", label="Diffusers: hotswap from memory (1 resident)")
        ax.axhline(1.0, ls="--", color="green", lw=0.8, label="target 1 ms")
        ax.set(xlabel="concepts / LoRAs loaded", ylabel="switch latency (ms)", title="1. Switching concepts")
        ax.legend(fontsize=8)
    ax = axes[0, 1]
    if "merge" in secs:
        t = secs["merge"]["times"]
        c = sorted(int(k) for k in t)
        ax.loglog(c, [t[k] for k in c], "o-", label="Share merge (one new concept)")
        ax.loglog(c, [t[c[0]] * x / c[0] for x in c], ":", color="gray", label="linear growth")
        ax.axhline(2.0, ls="--", color="green", lw=0.8, label="target 2 s")
        ax.set(xlabel="concepts in the Share state", ylabel="merge time (s)", title="6. Merge scaling")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    if "inference" in secs:
        inf = secs["inference"]
        labels, vals = [], []
        for row in inf["rows_overhead"]:
            labels.append(f"{row['variant']}\n(b=2)")
            vals.append(row["vs_base"])
        for row in inf["rows_mixed"]:
            labels.append(f"{row['variant']}\n(b=8)")
            vals.append(row["vs_base"])
        colors = ["tab:blue" if "share" in l else "tab:orange" if "peft" in l else "gray" for l in labels]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), labels, fontsize=7, rotation=60)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylim(min(vals) * 0.97, max(vals) * 1.02)
        ax.set_ylabel("UNet step time / base")
        ax.set_title("3–4. Inference (blue Share, orange PEFT)")
    ax = axes[1, 1]
    if "training" in secs:
        raw = secs["training"]["raw"]
        base = raw["lora-r4"]
        names = list(raw)
        x = range(len(names))
        w = 0.27
        for j, (key, label) in enumerate([("step_s", "step time"), ("peak_over_model_mib", "peak memory above model"),
                                           ("optimizer_state_bytes", "optimizer state")]):
            ax.bar([i + (j - 1) * w for i in x], [raw[v][key] / max(base[key], 1e-9) for v in names], w, label=label)
        ax.set_yscale("log")
        ax.set_xticks(list(x), names)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("relative to LoRA r4")
        ax.set_title("5. Training")
        ax.legend(fontsize=8)
    env = results["environment"]
    fig.suptitle(f"Share systems benchmark — {env['cpu']}, {env['torch_threads']} threads, {env['device']} {env['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
