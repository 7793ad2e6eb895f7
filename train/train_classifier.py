"""Train the identity classifier shipped in assets/classifier (used by share_lab.evaluation).

Why: with no outside weights, "does this generated image show concept X?" is answered by a small
CNN trained from scratch on renders of the base shapes and of every shipped concept, in random
contexts. Generated images always pass through the base model's VAE decoder, so half of the
training renders are passed through that VAE (encode, decode) too; blur, noise and colour
jitter stand in for the remaining imperfections. It prints its held-out accuracy on fresh renders
(as rendered, and through the VAE) and on the concepts' shipped held-out images.

    python train/train_classifier.py      # about 15 minutes on the 2-core CPU
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
from share_lab import world
from share_lab.evaluation import IdentityClassifier, to_batch


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


@torch.no_grad()
def through_vae(x: torch.Tensor, vae: AutoencoderKL, batch_size: int = 500) -> torch.Tensor:
    """Images as the base model's decoder draws them: decode(encode(x)), posterior mean."""
    return torch.cat([vae.decode(vae.encode(x[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(x), batch_size)])


def jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image colour gain/offset and pixel noise."""
    n = len(x)
    gain = 1 + 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    offset = 0.1 * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(x.shape, generator=generator)
    return (x * gain + offset + noise).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concepts", type=Path, default=share_lab.CONCEPTS)
    parser.add_argument("--output", type=Path, default=share_lab.ASSETS / "classifier")
    parser.add_argument("--vae", type=Path, default=share_lab.TINY_BASE / "vae")
    parser.add_argument("--images", type=int, default=24000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.time()
    torch.manual_seed(args.seed)
    folders = world.list_concepts(args.concepts)
    concepts = [f.generator() for f in folders]
    model = IdentityClassifier(list(world.SHAPES) + [f.name for f in folders], args.width)
    vae = AutoencoderKL.from_pretrained(args.vae, local_files_only=True).eval()
    x, y = render_labelled(args.images, concepts, args.seed, augment=True)
    half = torch.arange(len(x)) % 4 < 2  # renders alternate base/concept: half of each
    x[half] = through_vae(x[half], vae)
    print(f"rendered {len(x)} training images ({time.time() - start:.0f} s)", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=100, num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        model.train()
        index = torch.randint(len(x), (args.batch_size,), generator=generator)
        loss = F.cross_entropy(model(jitter(x[index], generator)), y[index])
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 500 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)

    fresh_x, fresh_y = render_labelled(2000, concepts, args.seed + 1, augment=False)
    heldout_x = to_batch([s.image for f in folders for s in f.heldout])
    heldout_y = torch.tensor([len(world.SHAPES) + k for k, f in enumerate(folders) for _ in f.heldout])
    results = {"fresh_renders_accuracy": accuracy(model, fresh_x, fresh_y),
               "fresh_renders_through_vae_accuracy": accuracy(model, through_vae(fresh_x, vae), fresh_y),
               "concept_heldout_accuracy": accuracy(model, heldout_x, heldout_y)}
    args.output.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), args.output / "model.safetensors")
    (args.output / "config.json").write_text(json.dumps(
        {"classes": model.classes, "width": args.width, **results, "seed": args.seed}, indent=2) + "\n")
    print(f"held-out accuracy ({len(model.classes)} classes): fresh renders {results['fresh_renders_accuracy']:.3f}, "
          f"the same through the VAE {results['fresh_renders_through_vae_accuracy']:.3f} ({len(fresh_x)} images), "
          f"concepts' held-out images {results['concept_heldout_accuracy']:.3f} ({len(heldout_x)}); "
          f"{(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
