"""Named training recipes and the augmentation of each imaging modality.

``paper`` is Finlayson et al.'s recipe for fine-tuning ImageNet weights: SGD, learning rate 1e-3,
momentum 0.9, constant rate. ``scratch`` is for networks trained from random initialization, where it
measured slightly better at the demo's budget (test AUC 0.945 vs 0.933 for a 3-epoch ResNet-18 on
PneumoniaMNIST; BENCHMARKS.md, "Training recipes"). ``auto`` picks ``paper`` for pretrained weights and ``scratch`` otherwise. The recipe used is
recorded in the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from medadv.errors import MedadvError


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str  # sgd | adamw
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (per step, to zero at the last step)
    description: str = ""

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def lr_at(self, step: int, total_steps: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        return self.lr

    def to_json(self) -> dict:
        return asdict(self)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("paper", "sgd", 1e-3, 0.9, 0.0, "constant",
               "Finlayson et al. 2018: SGD, lr 1e-3, momentum 0.9; for fine-tuning ImageNet weights."),
        Recipe("scratch", "adamw", 2e-3, 0.9, 1e-4, "cosine",
               "AdamW, lr 2e-3, weight decay 1e-4, cosine decay per step; for random initialization."),
        # the paper's SGD learns nothing in a 2-core budget at 224 px (issue 19: validation AUC 0.506 after
        # 20 steps), and scratch's lr 2e-3 saturates a pretrained network's probabilities in one epoch
        Recipe("finetune", "adamw", 3e-4, 0.9, 1e-4, "cosine",
               "AdamW, lr 3e-4, weight decay 1e-4, cosine decay per step; for fine-tuning ImageNet weights "
               "in a few hundred steps (the 224 px demo)."),
    )
}


def pick_recipe(name: str, pretrained: bool) -> Recipe:
    if name == "auto":
        name = "paper" if pretrained else "scratch"
    try:
        return RECIPES[name]
    except KeyError:
        raise MedadvError(f"unknown recipe '{name}'.", f"choose auto or one of {', '.join(RECIPES)}.") from None


class Augment:
    """The paper's augmentation for a modality, from MONAI transforms, applied image by image.

    chest X-ray: rotation within ±45° and horizontal flips; fundus and dermoscopy: any rotation
    (360°), horizontal and vertical flips, and mixup (alpha 0.2) on the batch.
    """

    def __init__(self, modality: str, seed: int, classes: int = 2, targets=None) -> None:
        from monai.transforms import Compose, RandFlip, RandRotate

        self.classes = classes
        if modality == "chest-xray":
            steps = [RandRotate(range_x=math.pi / 4, prob=1.0, padding_mode="zeros"), RandFlip(prob=0.5, spatial_axis=1)]
            self.mixup_alpha = 0.0
        else:
            pad = "zeros" if modality == "fundus" else "reflection"
            steps = [RandRotate(range_x=math.pi, prob=1.0, padding_mode=pad),
                     RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1)]
            self.mixup_alpha = 0.2
        self.modality = modality
        self.transform = Compose(steps).set_random_state(seed=seed)
        self._seed = seed
        self._mixers: dict[int, object] = {}
        self.targets = targets  # labels -> soft targets (a task kind's soft_targets); None: one-hot classes

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: N×C×H×W in [0, 1]; y: N class indices. Returns images and soft targets N×classes."""
        from monai.data import MetaTensor

        x = torch.stack([torch.as_tensor(self.transform(img)) for img in x]).clamp_(0, 1)
        if isinstance(x, MetaTensor):
            x = x.as_tensor()
        target = self.targets(y, self.classes) if self.targets is not None else nn.functional.one_hot(y, self.classes).float()
        if self.mixup_alpha > 0 and len(x) > 1:
            from monai.transforms import MixUp

            mixer = self._mixers.get(len(x))
            if mixer is None:
                mixer = self._mixers[len(x)] = MixUp(batch_size=len(x), alpha=self.mixup_alpha).set_random_state(
                    seed=self._seed + len(x))
            # MONAI's MixUp mixes tensors with 3 or 4 dims after the batch; labels ride along as N×K×1×1
            x, target = mixer(x, target[:, :, None, None])
            target = target[:, :, 0, 0]
        return x, target
