"""Issue 19, item 5: the paper's and CheXNet's networks (ResNet-50, DenseNet-121) take ImageNet weights from a
user's safetensors file in torchvision's layout, read as tensors only, and are attacked like any model.
The weights here are random, saved under torchvision's names (torchvision does not import beside this
torch)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from medadv.attacks import PGD, ThreatModel
from medadv.models.train import TrainConfig, build_classifier
from medadv.models.zoo import IMAGENET_MEAN, build_network


def _torchvision_file(arch: str, path, head: str) -> dict[str, torch.Tensor]:
    """Random weights as torchvision names them: no MONAI ``.layers.`` level, no bias on ResNet's
    downsampling convolution, a 1,000-class head."""
    torch.manual_seed(1)
    net = build_network(arch, 3, 224)
    state = {}
    for k, v in net.state_dict().items():
        if k.endswith("downsample.0.bias") or k.startswith(("fc.", "class_layers.")):
            continue
        state[k.replace(".layers.", ".")] = v.float().add(0.01).contiguous() if v.is_floating_point() else v
    width = 2048 if arch == "resnet50" else 1024
    state[f"{head}.weight"], state[f"{head}.bias"] = torch.randn(1000, width), torch.randn(1000)
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("arch,head,known", [
    ("resnet50", "fc", "layer1.0.downsample.0.weight"),
    ("densenet121", "classifier", "features.denseblock1.denselayer1.norm1.weight"),
])
def test_torchvision_weights_load_into_the_network_and_it_is_attacked(tmp_path, arch, head, known):
    path = tmp_path / f"{arch}.safetensors"
    state = _torchvision_file(arch, path, head)
    assert known in state  # torchvision's own name for that tensor
    model = build_classifier(TrainConfig(task="chest-xray", arch=arch, size=224, pretrained=str(path)), 1,
                             ("normal", "pneumonia")).eval()
    assert model.spec.net_channels == 3 and model.spec.mean == IMAGENET_MEAN  # gray X-rays repeated, ImageNet scaling
    own = model.network.state_dict()
    loaded = 0
    for k, v in own.items():
        src = state.get(k.replace(".layers.", "."))
        if src is not None and src.shape == v.shape:
            torch.testing.assert_close(v, src)
            loaded += 1
        elif k.endswith("downsample.0.bias"):
            assert torch.count_nonzero(v) == 0  # torchvision's convolution had no bias: zero, not random
    assert loaded == len(state) - 2  # every tensor but the 1,000-class head
    x, y = torch.randint(0, 256, (2, 1, 224, 224)).float() / 255, torch.tensor([0, 1])  # on the 8-bit grid
    result = PGD(ThreatModel(eps=2 / 255, steps=2, target="none", levels=255), 0)(model, x, y)
    assert (result.x_adv - x).abs().max() <= 2 / 255 + 1e-6 and not torch.equal(result.x_adv, x)
