"""The small CNN that names what a 64x64 image shows, and the image -> tensor conversion it shares
with the VAE (Diffusers' `VaeImageProcessor`)."""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from torch import nn

from . import world

_IMAGES = VaeImageProcessor(do_resize=False)


def to_batch(images) -> torch.Tensor:
    """PIL images -> float NCHW in [-1, 1] (the VAE's and the classifier's input range)."""
    return _IMAGES.preprocess([im.convert("RGB") for im in images])


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
