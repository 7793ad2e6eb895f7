#!/usr/bin/env python
"""Fold existing LoRA files into one Share file: ``python train/compress_loras.py LORAS... --output share.safetensors``.

No training data is needed: the shared basis is the top subspace of all the LoRAs' deltas and
each LoRA becomes one concept's coefficients in it. Prints each LoRA's reconstruction error
(‖ΔW − ΔŴ‖/‖ΔW‖) and the bytes saved. Accepts files or folders (every ``*.safetensors`` in a
folder, or a PEFT adapter folder), in Diffusers, PEFT or kohya key style, and for Flux also kohya/ComfyUI and
XLabs files (read through Diffusers' ``FluxLoraLoaderMixin``, as ``load_lora_weights`` reads them).
"""

import argparse
from pathlib import Path

from share_diffusers import loras_to_share
from share_diffusers.io import ShareFileError


def lora_inputs(paths: list[str]) -> list[Path]:
    """Expand folders into their LoRA files; a PEFT adapter folder counts as one LoRA."""
    found = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            found += sorted(path.glob("*.safetensors"))
        else:
            found.append(path)
    return found


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loras", nargs="+", help="LoRA files or folders")
    p.add_argument("--output", required=True, help="The Share file to write (replaced atomically if it exists)")
    p.add_argument("--names", nargs="*", default=None, help="Concept names (default: the file names)")
    p.add_argument("--basis_rank", type=int, default=64, help="k_max: the most directions per layer and side")
    p.add_argument("--basis_energy", type=float, default=None, help="keep the fewest directions holding this share of the energy")
    args = p.parse_args(argv)

    files = lora_inputs(args.loras)
    if not files:
        p.error("no LoRA files found in " + ", ".join(args.loras))
    names = args.names or [f.stem for f in files]
    try:
        report = loras_to_share(files, args.output, names=names, basis_rank=args.basis_rank, energy=args.basis_energy)
    except (ShareFileError, FileNotFoundError, ValueError) as e:
        p.exit(2, f"compress_loras.py: error: {e}\n")
    before, after = sum(size(f) for f in files), Path(args.output).stat().st_size
    width = max(len(n) for n in names)
    print(f"{'LoRA':<{width}}  reconstruction error")
    for name in names:
        print(f"{name:<{width}}  {report[name]['overall']:.4f}")
    print(f"{len(files)} LoRA files, {before / 1024:.1f} KiB -> {args.output}, {after / 1024:.1f} KiB ({before / after:.1f}x smaller)")
    return report


if __name__ == "__main__":
    main()
