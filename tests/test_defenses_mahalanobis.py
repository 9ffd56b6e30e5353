"""Mahalanobis detector (Lee et al. 2018) on penultimate features: the features are what the final layer
reads for every architecture family, the score is the tied-covariance distance computed by hand, the
calibrated threshold holds its false-positive rate on held-out clean images, non-adaptive PGD is detected
above chance, and the adaptive attack (shared with feature squeezing) gets more images past it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medadv.attacks import PGD, ThreatModel
from medadv.defenses import DefendedModel, build_preprocessor
from medadv.defenses.detect import Detector, FeatureSqueezing, adaptive_attack, detection_auc
from medadv.defenses.mahalanobis import Mahalanobis
from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from defense_support import _one_thread, tiny_classifier  # noqa: F401  (_one_thread: autouse fixture)


def fake_data(n: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 28, 28, generator=g) * 0.6 + 0.3 * y[:, None, None, None]).clamp(0, 1)
    return x, y


# -- features() --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("densenet121", 1024), ("efficientnet-lite0", 1280)])
def test_features_are_the_input_of_the_final_layer_for_each_architecture_family(arch, dim):
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray", arch=arch, size=32), 1, ("normal", "pneumonia")).eval()
    x = torch.rand(3, 1, 28, 28)  # stored size differs from the network's: features() resizes like forward()
    f = model.features(x)
    assert f.shape == (3, dim)
    head = [m for m in model.network.modules() if isinstance(m, nn.Linear)][-1]
    assert torch.allclose(head(f), model(x), atol=1e-5)  # the logits are the final layer applied to them
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.features(xg).sum(), xg)
    assert g.abs().sum() > 0  # differentiable in the stored pixels
    assert not any(h for m in model.network.modules() for h in (m._forward_pre_hooks, m._forward_hooks))  # hook removed


def test_features_of_a_network_without_a_linear_head_is_one_clear_error():
    spec = ModelSpec(arch="conv-only", input_size=28, data_channels=1, net_channels=1, mean=(0.5,), std=(0.25,),
                     task="chest-xray", class_names=("normal", "pneumonia"))
    model = MedicalClassifier(nn.Sequential(nn.Conv2d(1, 2, 28), nn.Flatten()), spec)
    with pytest.raises(MedadvError, match="final linear layer"):
        model.features(torch.rand(2, 1, 28, 28))


# -- the score by hand, errors, the shared base ----------------------------------------------------------

@pytest.mark.parametrize("covariance", ["ledoit-wolf", "empirical"])
def test_score_is_the_tied_covariance_distance_to_the_nearest_class(covariance):
    from sklearn.covariance import EmpiricalCovariance, LedoitWolf

    model = tiny_classifier()
    x, y = fake_data(80)
    det = Mahalanobis(model, covariance=covariance).fit(x, y)
    with torch.no_grad():
        f = model.features(x).double().numpy()
    means = np.stack([f[y.numpy() == c].mean(0) for c in (0, 1)])
    est = (LedoitWolf if covariance == "ledoit-wolf" else EmpiricalCovariance)(assume_centered=True)
    est.fit(f - means[y.numpy()])
    x_new, _ = fake_data(10, seed=1)
    with torch.no_grad():
        f_new = model.features(x_new).double().numpy()
    want = np.sqrt(np.stack([est.mahalanobis(f_new - m) for m in means], 1).min(1))  # sklearn: squared distances
    got = det.scores(x_new).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3)
    assert isinstance(det, Detector) and isinstance(FeatureSqueezing(model), Detector)


def test_input_preprocessing_step_lowers_clean_scores_and_keeps_the_score_differentiable():
    model = tiny_classifier()
    x, y = fake_data(80)
    plain = Mahalanobis(model).fit(x, y)
    stepped = Mahalanobis(model, noise=0.01).fit(x, y)
    assert float((stepped.scores(x) < plain.scores(x)).float().mean()) > 0.9  # a step toward the nearest class
    xg = x[:4].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(stepped.score(xg).sum(), xg)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_use_is_one_clear_error():
    model = tiny_classifier()
    x, y = fake_data(20)
    det = Mahalanobis(model)
    with pytest.raises(MedadvError, match="not fitted"):
        det.scores(x)
    with pytest.raises(MedadvError, match="features"):
        Mahalanobis(DefendedModel(model, build_preprocessor("median")))
    with pytest.raises(MedadvError, match="covariance"):
        Mahalanobis(model, covariance="graphical-lasso")
    with pytest.raises(MedadvError, match="noise"):
        Mahalanobis(model, noise=-0.1)
    with pytest.raises(MedadvError, match="each of at least 2 classes"):
        det.fit(x, torch.zeros(20, dtype=torch.long))
    det.fit(x, y)
    with pytest.raises(MedadvError, match="threshold"):
        det.flags(x)
    with pytest.raises(MedadvError, match="threshold"):
        adaptive_attack(det, x, y, ThreatModel(steps=1))
    with pytest.raises(MedadvError, match="at least one"):
        detection_auc(det, x, x[:0])


def test_detection_auc_orders_adversarial_above_clean():
    class MeanBrightness(Detector):
        def score(self, x):
            return x.flatten(1).mean(1)

    det = MeanBrightness(tiny_classifier())
    dark, bright = torch.full((5, 1, 28, 28), 0.2), torch.full((7, 1, 28, 28), 0.8)
    assert detection_auc(det, dark, bright) == 1.0 and detection_auc(det, bright, dark) == 0.0
    assert detection_auc(det, dark, dark) == 0.5


# -- real data: a briefly trained ResNet-18 on PneumoniaMNIST -----------------------------------------------

@pytest.fixture(scope="module")
def setting(data_root, tmp_path_factory):
    """ResNet-18 (small stem, 28 px) trained 1 epoch on 400 PneumoniaMNIST images; the detector fitted on
    1000 training images; validation split in two seeded halves (calibration, held-out); 100 test images."""
    from medadv.data import load_split
    from medadv.models.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside _one_thread
    try:
        model, _ = train(TrainConfig(task="chest-xray", arch="resnet18", size=28, epochs=1, max_train=400,
                                     batch_size=64), tmp_path_factory.mktemp("mahalanobis") / "ck", data_root=data_root)
        read = dict(data_root=data_root, source="medmnist:pneumoniamnist", size=28)
        tr, va, te = (load_split("chest-xray", s, **read) for s in ("train", "val", "test"))
        rng = np.random.default_rng(1)
        i = np.sort(rng.permutation(len(tr))[:1000])
        det = Mahalanobis(model).fit(tr.tensor(i), torch.from_numpy(tr.labels[i]))
        v = rng.permutation(len(va))
        cal, held = va.tensor(np.sort(v[: len(v) // 2])), va.tensor(np.sort(v[len(v) // 2:]))
        det.calibrate(cal, 0.05)
        j = np.sort(rng.permutation(len(te))[:100])
        x, y = te.tensor(j), torch.from_numpy(te.labels[j])
        threat = ThreatModel(eps=8 / 255, steps=10, target="none")
        x_pgd = PGD(threat)(model, x, y).x_adv
        x_adaptive = adaptive_attack(det, x, y, threat, weight=10.0)
    finally:
        torch.set_num_threads(threads)
    return dict(model=model, det=det, cal=cal, held=held, x=x, y=y, x_pgd=x_pgd, x_adaptive=x_adaptive, threat=threat)


@pytest.mark.slow  # the module's setting trains a ResNet-18 and attacks 100 images (~35 s)
def test_calibrated_threshold_gives_about_5_percent_false_positives_on_held_out_clean_images(setting):
    det, cal, held = setting["det"], setting["cal"], setting["held"]
    assert float(det.flags(cal).float().mean()) <= 0.05 + 1 / len(cal)  # by construction
    fpr = float(det.flags(held).float().mean())
    print(f"\nMahalanobis: threshold {det.threshold:.2f}, FPR {100 * fpr:.1f}% on {len(held)} held-out clean "
          f"validation images (calibrated at 5% on {len(cal)})")
    assert 0.01 <= fpr <= 0.10


@pytest.mark.slow  # the module's setting trains a ResNet-18 and attacks 100 images (~35 s)
def test_pgd_is_detected_above_chance_and_the_adaptive_attack_gets_more_past(setting):
    model, det, x, y = setting["model"], setting["det"], setting["x"], setting["y"]

    def outcome(x_adv):
        fooled = torch.from_numpy(model.predict(model.probabilities(x_adv))) != y
        flagged = det.flags(x_adv)
        return float(fooled.float().mean()), float(flagged[fooled].float().mean()), int((fooled & ~flagged).sum())

    assert (setting["x_adaptive"] - x).abs().max() <= 8 / 255 + 1e-6
    auc = detection_auc(det, x, setting["x_pgd"])
    auc_adaptive = detection_auc(det, x, setting["x_adaptive"])
    fooled, detected, evaded = outcome(setting["x_pgd"])
    fooled_a, detected_a, evaded_a = outcome(setting["x_adaptive"])
    print(f"\nMahalanobis on {len(x)} test images, PGD-10 eps 8/255: AUC {auc:.3f}, fooled {100 * fooled:.0f}%, "
          f"detected {100 * detected:.1f}% of fooled, {evaded} evade; adaptive: AUC {auc_adaptive:.3f}, fooled "
          f"{100 * fooled_a:.0f}%, detected {100 * detected_a:.1f}% of fooled, {evaded_a} evade")
    assert fooled > 0.5 and auc > 0.6  # the non-adaptive attack works, and the detector sees it above chance
    # the adaptive attack lowers the detection rate and more fooled images evade; no fixed margin: on an
    # AVX2-only machine the same seeds give 10.2% -> 5.7% (79 -> 82 evade), elsewhere a wider gap
    assert fooled_a > 0.5 and detected_a < detected and evaded_a > evaded
