"""The published numbers medadv's reproduction is compared with.

Finlayson, Kohane & Beam, "Adversarial Attacks Against Medical Deep Learning Systems" (2018), Table 2:
accuracy, AUC and mean confidence of the predicted class, for clean test images and for PGD (eps 0.02,
step 0.01 in [-1, 1] pixel space, 20 iterations, targeted at the opposite class) white box and black box
(crafted on an independently trained ResNet-50 surrogate). Their models: ImageNet-pretrained ResNet-50s
at 224 px fine-tuned with SGD (lr 1e-3, momentum 0.9).
"""

from __future__ import annotations

PAPER_TASK_NAMES = {"fundus-dr": "Fundoscopy", "chest-xray": "Chest X-ray", "derm-melanoma": "Dermoscopy"}

# task -> condition -> (accuracy, AUC, mean confidence)
PAPER_TABLE2: dict[str, dict[str, tuple[float, float, float]]] = {
    "fundus-dr": {"clean": (0.910, 0.910, 0.904), "white": (0.0, 0.0, 1.0), "black": (0.0001, 0.002, 0.909)},
    "chest-xray": {"clean": (0.949, 0.937, 0.961), "white": (0.0, 0.0, 1.0), "black": (0.151, 0.014, 0.926)},
    "derm-melanoma": {"clean": (0.876, 0.858, 0.941), "white": (0.0, 0.0, 1.0), "black": (0.379, 0.071, 0.920)},
}

PAPER_SETUP = {
    "fundus-dr": "Kaggle DR fundus photos, ResNet-50 at 224 px (ImageNet-pretrained)",
    "chest-xray": "NIH ChestX-ray14 pneumothorax vs no finding, ResNet-50 at 224 px (ImageNet-pretrained)",
    "derm-melanoma": "ISIC Archive melanoma vs nevus, ResNet-50 at 224 px (ImageNet-pretrained)",
}
