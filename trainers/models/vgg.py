"""CIFAR-style VGG (as used by Santurkar et al. 2018): 3x3 conv blocks with norm, max-pooling."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from shiftlab.trainers.models import default_norm, make_activation

PRESETS: dict[str, list] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg_small": [32, "M", 64, "M", 128, 128, "M"],
}


class VGG(nn.Module):
    """Args:
        layout: a preset name or a list of channel counts and ``"M"`` (max-pool).
        width_mult: scales every channel count (quick CPU runs).
        classifier_hidden: hidden width of the classifier (0: single linear layer).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, layout: str | Sequence = "vgg11",
                 width_mult: float = 1.0, activation: str = "relu",
                 norm: Callable[[int, int], nn.Module] = default_norm, classifier_hidden: int = 0) -> None:
        super().__init__()
        if isinstance(layout, str):
            if layout not in PRESETS:
                raise ValueError(f"model.layout={layout!r} is unknown; allowed: {', '.join(PRESETS)} or a list")
            layout = PRESETS[layout]
        if len(input_shape) != 3:
            raise ValueError(f"model=vgg needs (C, H, W) images, got input shape {tuple(input_shape)}")
        layers: list[nn.Module] = []
        c_in = input_shape[0]
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = max(1, int(round(int(item) * width_mult)))
            layers += [nn.Conv2d(c_in, c, 3, padding=1), norm(c, 2), make_activation(activation)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        head: list[nn.Module] = [nn.Flatten()]
        if classifier_hidden:
            head += [nn.Linear(c_in, classifier_hidden), norm(classifier_hidden, 0), make_activation(activation)]
            c_in = classifier_hidden
        head.append(nn.Linear(c_in, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
