"""What the defense tests share: one torch thread per test, and a tiny CNN wrapped as a medadv model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medadv.models.wrapper import MedicalClassifier, ModelSpec


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine two threads per process mostly wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_classifier(seed: int = 0, threshold: float = 0.5) -> MedicalClassifier:
    """Two convolutions and a linear head (N×1×28×28 in [0, 1] -> N×2 logits), seeded, in eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    spec = ModelSpec(arch="tiny", input_size=28, data_channels=1, net_channels=1, mean=(0.5,), std=(0.25,),
                     task="chest-xray", class_names=("normal", "pneumonia"), threshold=threshold)
    return MedicalClassifier(net, spec).eval()
