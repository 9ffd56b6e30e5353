"""Robust training hooks: PGD-AT, TRADES, fast FGSM-AT and noise augmentation run inside medadv's training
loop, stay inside their budget, select the model on robust validation accuracy and record the defense."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medadv.defenses.training import fast_examples, make_step_loss, pgd_examples, trades_examples, robust_training
from medadv.errors import MedadvError
from defense_support import _one_thread  # noqa: F401  (autouse fixture)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("craft", ["pgd", "fast", "trades"])
def test_training_examples_stay_in_the_ball_and_raise_the_loss(craft):
    model, eps = tiny(), 4 / 255
    x, y = torch.rand(8, 1, 12, 12), torch.tensor([0, 1] * 4)
    g = torch.Generator().manual_seed(0)
    model.train()
    if craft == "pgd":
        x_adv = pgd_examples(model, x, y, eps, 5, g)
    elif craft == "fast":
        x_adv = fast_examples(model, x, y, eps, g)
    else:
        x_adv = trades_examples(model, x, eps, 5, g)
    assert model.training and all(p.requires_grad for p in model.parameters())  # restored after crafting
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        if craft == "trades":
            kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="sum")
            assert kl > 0
        else:
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_step_losses_are_finite_and_differentiable():
    model, x, y = tiny(), torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 0, 1, 0, 1])
    target = F.one_hot(y, 2).float()
    assert make_step_loss(None) is None
    for method, noise in (("pgd", 0.0), ("trades", 0.0), ("fast", 0.0), (None, 0.25), ("pgd", 0.1)):
        loss = make_step_loss(method, eps=8 / 255, steps=2, noise_sigma=noise)(model, x, target, y,
                                                                               torch.Generator().manual_seed(1))
        assert torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, model[-1].weight)
        assert g.abs().sum() > 0


@pytest.mark.parametrize("kwargs,needle", [({"method": "free"}, "unknown adversarial"),
                                           ({"method": "pgd", "eps": 0}, "--adv-eps"),
                                           ({"method": "pgd", "steps": 0}, "--adv-steps"),
                                           ({"method": "trades", "trades_beta": 0}, "--trades-beta"),
                                           ({"method": None, "noise_sigma": -1}, "--noise-sigma")])
def test_bad_settings_are_one_clear_error(kwargs, needle):
    method = kwargs.pop("method")
    with pytest.raises(MedadvError, match=needle):
        make_step_loss(method, **kwargs)


def test_trades_training_runs_and_records_its_defense(data_root, tmp_path):
    from medadv.models import load_checkpoint, read_metadata
    from medadv.models.train import TrainConfig, train

    cfg = TrainConfig(task="chest-xray", arch="resnet18", size=28, epochs=1, batch_size=32, max_train=64,
                      augment=False, adversarial="trades", adv_eps=4 / 255, adv_steps=2, robust_val_images=32,
                      trades_beta=3.0)
    train(cfg, tmp_path / "ck", data_root=data_root, robust=robust_training(cfg))
    saved = read_metadata(tmp_path / "ck")
    assert saved["defense"] == {"kind": "training", "method": "trades", "noise_sigma": 0.0, "eps": pytest.approx(4 / 255),
                                "eps_levels_8bit": pytest.approx(4.0), "steps": 2, "norm": "linf", "trades_beta": 3.0}
    assert saved["training"]["selection"] == "robust validation accuracy"
    assert {"val_auc", "val_robust_accuracy", "val_robust_auc"} <= set(saved["training"]["history"][0])
    model, _ = load_checkpoint(tmp_path / "ck")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 2)


def test_noise_training_selects_on_clean_auc_and_plain_hash_is_unchanged(data_root, tmp_path):
    from dataclasses import asdict

    from medadv.models.train import TrainConfig, _hashed_config, train

    plain = TrainConfig(task="chest-xray")
    assert set(_hashed_config(plain)) == set(asdict(plain)) - {"adversarial", "adv_eps", "adv_steps", "trades_beta",
                                                               "noise_sigma", "robust_val_images", "sync_batchnorm",
                                                               # later options: absent at their defaults
                                                               "findings", "uncertain", "class_weights",
                                                               "threshold_rule", "max_val"}
    cfg = TrainConfig(task="chest-xray", arch="resnet18", size=28, epochs=1, batch_size=16, max_train=32,
                      augment=False, noise_sigma=0.25)
    _, meta = train(cfg, tmp_path / "ck", data_root=data_root, robust=robust_training(cfg))
    assert meta["defense"] == {"kind": "training", "method": "noise", "noise_sigma": 0.25}
    assert meta["training"]["selection"] == "validation AUC"
    assert "val_robust_accuracy" not in meta["training"]["history"][0]


def test_cli_train_rejects_a_bad_adversarial_flag(tmp_path, capsys):
    from medadv.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "chest-xray", "--out", str(tmp_path / "m"), "--adversarial", "free"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown adversarial training 'free'" in err and "Fix:" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1


@pytest.mark.slow  # two PGD trainings (~15 s)
def test_pgd_training_records_its_defense_and_resumes_to_the_same_weights(data_root, tmp_path):
    from medadv.models import read_metadata
    from medadv.models.train import TrainConfig, train
    from medadv.progress import Monitor

    class Kill(Monitor):
        def log(self, message: str) -> None:
            if message.startswith("epoch 1/"):
                raise KeyboardInterrupt  # killed right after the first epoch

    cfg = dict(task="chest-xray", arch="resnet18", size=28, epochs=2, batch_size=16, max_train=32, augment=False,
               adversarial="pgd", adv_eps=4 / 255, robust_val_images=16, adv_steps=2, seed=3)
    full, meta_full = train(TrainConfig(**cfg), tmp_path / "full", data_root=data_root, robust=robust_training(TrainConfig(**cfg)))
    saved = read_metadata(tmp_path / "full")  # PGD-AT records its defense, selects on robust accuracy
    assert saved["defense"]["method"] == "pgd" and saved["defense"]["eps"] == pytest.approx(4 / 255)
    assert saved["training"]["adversarial"] == "pgd" and saved["training"]["adv_steps"] == 2
    assert saved["training"]["selection"] == "robust validation accuracy"
    history = saved["training"]["history"]
    assert len(history) == 2 and all({"val_auc", "val_robust_accuracy", "val_robust_auc"} <= set(h) for h in history)
    best = max(history, key=lambda h: h["val_robust_accuracy"])  # the first best wins ties
    assert saved["training"]["best_epoch"] == best["epoch"]
    assert saved["training"]["best_val_auc"] == best["val_auc"]  # the clean AUC of the selected epoch
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**cfg), tmp_path / "resumed", data_root=data_root, monitor=Kill(), robust=robust_training(TrainConfig(**cfg)))
    resumed, meta = train(TrainConfig(**cfg), tmp_path / "resumed", data_root=data_root, robust=robust_training(TrainConfig(**cfg)))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert meta["training"]["best_epoch"] == meta_full["training"]["best_epoch"]
    assert [h["val_robust_accuracy"] for h in meta["training"]["history"]] == \
        [h["val_robust_accuracy"] for h in meta_full["training"]["history"]]
