"""The small CNN that names what a 64x64 image shows, the image -> tensor conversion it shares
with the VAE (Diffusers' `VaeImageProcessor`), and images as a base's VAE gives them back."""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from . import world

_IMAGES = VaeImageProcessor(do_resize=False)


def to_batch(images) -> torch.Tensor:
    """PIL images -> float NCHW in [-1, 1] (the VAE's and the classifier's input range)."""
    return _IMAGES.preprocess([im.convert("RGB") for im in images])


@torch.no_grad()
def through_vae(x: torch.Tensor, vae, batch_size: int = 500) -> torch.Tensor:
    """Images as the base model's decoder draws them: decode(encode(x)), posterior mean."""
    return torch.cat([vae.decode(vae.encode(x[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
                      for i in range(0, len(x), batch_size)])


def round_trip(images, vae) -> list:
    """The same for PIL images (the parts reader reads pixels, not tensors)."""
    return _IMAGES.postprocess(through_vae(to_batch(images), vae), output_type="pil")


class IdentityClassifier(nn.Module):
    """Small CNN naming the object in a 64x64 render: a base shape or a shipped concept.

    Global pooling makes it blind to where the object is, which the analytic checks measure.
    """

    def __init__(self, classes: list[str], width: int = 24):
        super().__init__()
        self.classes = list(classes)
        channels = [3, width, 2 * width, 3 * width, 4 * width]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], len(self.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images) -> list[str]:
        logits = self(to_batch([im.resize((world.RESOLUTION,) * 2) for im in images]))
        return [self.classes[i] for i in logits.argmax(dim=1).tolist()]
