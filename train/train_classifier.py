"""Train the identity classifier shipped in assets/classifier (used by share_lab.evaluation).

Why: with no outside weights, "does this generated image show concept X?" is answered by a small
CNN trained from scratch on renders. Generated images always pass through the base model's VAE
decoder, so half of the training renders are passed through that VAE (encode, decode) too; blur,
noise and colour jitter stand in for the remaining imperfections.

- ``--kind parts`` (the shipped one, for world-v2 concepts): the parts reader of share_lab.parts,
  which names silhouette, layout and colours, so it knows every world-v2 concept without retraining.
  It prints its identity accuracy on the concepts' held-out images, as rendered and as round trips.
- ``--kind concepts`` (tiny base v3's): one class per base shape and per concept folder of world v1;
  it prints its accuracy on fresh renders (as rendered, and through the VAE) and on the concepts'
  held-out images.

    python train/train_classifier.py      # the parts reader: about 16 minutes on the 2-core CPU, 2 threads
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from PIL import ImageFilter
from safetensors.torch import save_file

import share_lab
from share_lab import parts, world
from share_lab.classifier import IdentityClassifier, round_trip, through_vae, to_batch


def render_labelled(n: int, concepts: list[world.Concept], seed: int, augment: bool):
    """n renders with labels: base shapes (any colour and context) and concepts, half and half."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        if i % 2 == 0:
            shape = str(rng.choice(world.SHAPES))
            colour, background = rng.choice(list(world.COLOURS), size=2, replace=False)
            scene = world.Scene(shape, str(colour), str(background), str(rng.choice(list(world.POSITIONS))),
                                str(rng.choice(list(world.SIZES))))
            image, label = scene.render(rng), world.SHAPES.index(shape)
        else:
            k = int(rng.integers(len(concepts)))
            background, position = concepts[k].contexts(1, rng)[0]
            image, label = concepts[k].render(background, position, rng), len(world.SHAPES) + k
        if augment:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2)))
        images.append(image)
        labels.append(label)
    return to_batch(images), torch.tensor(labels)


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image colour gain/offset and pixel noise."""
    n = len(x)
    gain = 1 + 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    offset = 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return (x * gain + offset + noise).clamp(-1, 1)


def fit(model, x: torch.Tensor, loss_of, steps: int, batch_size: int = 64, seed: int = 0) -> None:
    """AdamW, cosine schedule, jittered batches; ``loss_of(logits, index)`` is the loss of ``x[index]``."""
    start = time.time()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        model.train()
        index = torch.randint(len(x), (batch_size,), generator=generator)
        loss = loss_of(model(jitter(x[index], generator)), index)
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 500 == 0:
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


def train_parts_reader(vae: AutoencoderKL, images: int, steps: int, width: int) -> IdentityClassifier:
    """The parts reader's CNN on role maps of world-v2 renders, every other one a VAE round trip."""
    torch.manual_seed(0)
    model = parts.new_classifier(width)
    renders, targets = parts.labelled_renders(images, seed=0)
    trips = iter(round_trip(renders[::2], vae))
    x = parts.role_maps([next(trips) if i % 2 == 0 else im for i, im in enumerate(renders)])
    fit(model, x, lambda logits, index: parts.loss(logits, {k: v[index] for k, v in targets.items()}), steps)
    return model


def save(model: IdentityClassifier, folder: Path, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"classes": model.classes, "width": model.features[0].out_channels, **config}, indent=2) + "\n")


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_concept_classifier(args, vae: AutoencoderKL) -> None:
    folders = world.list_concepts(args.concepts)
    concepts = [f.generator() for f in folders]
    model = IdentityClassifier(list(world.SHAPES) + [f.name for f in folders], args.width)
    x, y = render_labelled(args.images, concepts, args.seed, augment=True)
    half = torch.arange(len(x)) % 4 < 2  # renders alternate base/concept: half of each
    x[half] = through_vae(x[half], vae)
    fit(model, x, lambda logits, index: F.cross_entropy(logits, y[index]), args.steps, args.batch_size, args.seed)

    fresh_x, fresh_y = render_labelled(2000, concepts, args.seed + 1, augment=False)
    heldout_x = to_batch([s.image for f in folders for s in f.heldout])
    heldout_y = torch.tensor([len(world.SHAPES) + k for k, f in enumerate(folders) for _ in f.heldout])
    results = {"fresh_renders_accuracy": accuracy(model, fresh_x, fresh_y),
               "fresh_renders_through_vae_accuracy": accuracy(model, through_vae(fresh_x, vae), fresh_y),
               "concept_heldout_accuracy": accuracy(model, heldout_x, heldout_y)}
    save(model, args.output, **results, seed=args.seed)
    print(f"held-out accuracy ({len(model.classes)} classes): fresh renders {results['fresh_renders_accuracy']:.3f}, "
          f"the same through the VAE {results['fresh_renders_through_vae_accuracy']:.3f} ({len(fresh_x)} images), "
          f"concepts' held-out images {results['concept_heldout_accuracy']:.3f} ({len(heldout_x)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=("parts", "concepts"), default="parts",
                        help="parts: the world-v2 parts reader (shipped); concepts: one class per world-v1 concept folder")
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--output", type=Path, default=share_lab.ASSETS / "classifier")
    parser.add_argument("--vae", type=Path, default=share_lab.TINY_BASE / "vae")
    parser.add_argument("--images", type=int, help="training renders (parts 12000, concepts 24000)")
    parser.add_argument("--steps", type=int, help="parts 5000, concepts 3000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, help="the first layer's channels (parts 32, concepts 24)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    defaults = {"parts": (12000, 5000, 32), "concepts": (24000, 3000, 24)}[args.kind]
    args.images, args.steps, args.width = (given or default for given, default in
                                           zip((args.images, args.steps, args.width), defaults))

    start = time.time()
    torch.manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval()
    if args.kind == "concepts":
        train_concept_classifier(args, vae)
    else:
        model = train_parts_reader(vae, args.images, args.steps, args.width)
        save(model, args.output, kind="parts")  # evaluation.load_identity_classifier gives a parts.PartsReader
        reader = parts.PartsReader(model)
        folders = world.list_concepts(args.concepts)
        heldout = [(f.name, s.image) for f in folders for s in f.heldout]
        for label, images in (("renders", [im for _, im in heldout]), ("round trips", round_trip([im for _, im in heldout], vae))):
            right = np.mean([got == name for (name, _), got in zip(heldout, reader.predict(images))])
            print(f"identity of the {len(folders)} concepts' {len(heldout)} held-out {label}: {right:.3f}")
    print(f"{(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
