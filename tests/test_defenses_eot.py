"""Expectation over transformation: a randomized defense (Gaussian noise on the input) is recognized as
randomized, EOT averages its stochastic passes into one batched forward whose gradient is the averaged
one, and PGD through EOT brings the noisy model's accuracy lower than PGD through a single noisy pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medadv.attacks import PGD, ThreatModel
from medadv.defenses import PREPROCESSORS, DefendedModel, build_preprocessor, defend
from medadv.defenses.eot import EOT, is_randomized
from medadv.defenses.noise import GaussianNoise
from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from defense_support import _one_thread  # noqa: F401  (autouse fixture)


def small_classifier(width: int = 16, seed: int = 0) -> MedicalClassifier:
    torch.manual_seed(seed)
    w = width
    net = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 2))
    spec = ModelSpec(arch="small", input_size=28, data_channels=1, net_channels=1, mean=(0.5,), std=(0.25,),
                     task="chest-xray", class_names=("normal", "pneumonia"), threshold=0.5)
    return MedicalClassifier(net, spec).eval()


class RandomLogits(nn.Module):
    """Logits = (mean pixel, -mean pixel) · (1 + ε), ε ~ N(0, 1) per image: expectation (m, -m)."""

    threshold = 0.5

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([m, -m], 1) * (1 + torch.randn(len(x), 1))


# -- the noise defense ---------------------------------------------------------------------------------------

def test_gaussian_noise_is_a_registered_differentiable_randomized_defense():
    assert PREPROCESSORS["gaussian-noise"] is GaussianNoise and GaussianNoise.differentiable
    pre = build_preprocessor("gaussian-noise", sigma=0.1)
    x = torch.full((8, 1, 28, 28), 0.5)
    torch.manual_seed(0)
    a, b = pre(x), pre(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, b)
    assert abs(float((a - x).std()) - 0.1) < 0.005  # N(0, 0.1²) away from the clamp
    d = defend(small_classifier(), [pre.to_json()])  # rebuilt from its JSON record, as a checkpoint would
    assert d.to_json()["defenses"][0] == {"name": "gaussian-noise", "differentiable": True, "sigma": 0.1}
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(pre(xg).sum(), xg)
    assert torch.equal(g, torch.ones_like(x))  # the clamp is inactive at 0.5 ± small noise: identity gradient
    for bad in (0, -0.1, float("nan"), "0.1"):
        with pytest.raises(MedadvError, match="sigma"):
            GaussianNoise(bad)


def test_is_randomized_tells_a_noisy_model_from_a_deterministic_one():
    model = small_classifier()
    x = torch.rand(4, 1, 28, 28)
    assert is_randomized(defend(model, [{"name": "gaussian-noise", "sigma": 0.05}]), x)
    assert not is_randomized(model, x)
    assert not is_randomized(defend(model, "median"), x)  # a deterministic defense
    assert not is_randomized(EOT(model, 4), x)
    dropout = nn.Sequential(nn.Dropout(0.5), nn.Flatten(), nn.Linear(784, 2)).train()
    assert not is_randomized(dropout, x)  # judged in eval mode, as attacks run: dropout is off there...
    assert dropout.training  # ...and the model's mode is left as it was
    with pytest.raises(MedadvError, match="at least one image"):
        is_randomized(model, x[:0])


def test_eot_averages_the_stochastic_passes_in_one_batch_and_its_gradient_concentrates():
    x = torch.rand(3, 1, 28, 28)
    m = x.flatten(1).mean(1)
    torch.manual_seed(0)
    out = EOT(RandomLogits(), samples=4000)(x)
    assert out.shape == (3, 2)
    tol = 0.1 * float(m.max())  # 4000 draws: the mean's error is ~1.6% of m
    assert torch.allclose(out[:, 0], m, atol=tol) and torch.allclose(out[:, 1], -m, atol=tol)
    single = RandomLogits()(x)
    assert (single[:, 0] - m).abs().max() > (out[:, 0] - m).abs().max()  # one pass is far noisier

    calls = []

    class Counting(nn.Module):
        def forward(self, z):
            calls.append(len(z))
            return RandomLogits()(z)

    EOT(Counting(), samples=8)(x)
    assert calls == [24]  # one batched pass over the repeated images

    # a deterministic model: EOT changes nothing, logits nor gradient
    model = small_classifier()
    xg = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(xg), torch.tensor([0, 1, 0])), xg)
    (g8,) = torch.autograd.grad(F.cross_entropy(EOT(model, 8)(xg), torch.tensor([0, 1, 0])), xg)
    assert torch.allclose(g1, g8, atol=1e-6)
    e = EOT(model, 8)
    assert e.threshold == model.threshold and e.spec is model.spec and e.probabilities(x).shape == (3,)
    with pytest.raises(MedadvError, match="samples"):
        EOT(model, samples=0)


# -- real data: PGD through EOT vs through one noisy pass -----------------------------------------------------

@pytest.fixture(scope="module")
def noisy(data_root):
    """A small CNN trained (~3 s) on 600 real PneumoniaMNIST images with N(0, 0.1²) input noise, defended by
    Gaussian noise of sigma 0.2 at every pass; 100 test images."""
    from medadv.data import load_split

    read = dict(data_root=data_root, source="medmnist:pneumoniamnist", size=28)
    train, test = load_split("chest-xray", "train", **read), load_split("chest-xray", "test", **read)
    rng = np.random.default_rng(0)
    i = np.sort(rng.permutation(len(train))[:600])
    x, y = train.tensor(i), torch.from_numpy(train.labels[i])
    model = small_classifier()
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside _one_thread
    try:
        torch.manual_seed(0)
        for _ in range(15):
            for b in range(0, len(x), 50):
                opt.zero_grad()
                xb = (x[b:b + 50] + 0.1 * torch.randn_like(x[b:b + 50])).clamp(0, 1)
                F.cross_entropy(model(xb), y[b:b + 50]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    j = np.sort(rng.permutation(len(test))[:100])
    return DefendedModel(model, GaussianNoise(0.2)), test.tensor(j), torch.from_numpy(test.labels[j])


def expected_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 16) -> float:
    """Accuracy of the randomized model averaged over ``draws`` noise draws (seeded: the same for every x)."""
    torch.manual_seed(123)
    with torch.no_grad():
        hits = [(torch.softmax(model(x), 1)[:, 1] >= model.threshold).long() == y for _ in range(draws)]
    return float(torch.stack(hits).float().mean())


def test_pgd_through_eot_beats_pgd_through_a_single_noisy_pass(noisy):
    defended, x, y = noisy
    assert is_randomized(defended, x[:4])
    threat = ThreatModel(eps=8 / 255, steps=5, target="none")

    def attacked(victim) -> float:
        torch.manual_seed(7)  # the noise the attack sees
        x_adv = PGD(threat, seed=0)(victim, x, y).x_adv
        assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
        return expected_accuracy(defended, x_adv, y)

    clean = expected_accuracy(defended, x, y)
    plain = attacked(defended.model)  # ignores the noise altogether
    single = attacked(defended)
    eot8, eot16 = attacked(EOT(defended, 8)), attacked(EOT(defended, 16))
    print(f"\nGaussian noise sigma 0.2, {len(x)} test images, PGD-5 eps 8/255, accuracy over 16 draws: clean "
          f"{100 * clean:.1f}%, PGD on the noiseless model {100 * plain:.1f}%, through one noisy pass "
          f"{100 * single:.1f}%, EOT-8 {100 * eot8:.1f}%, EOT-16 {100 * eot16:.1f}%")
    assert clean > 0.75 and single < clean
    assert eot8 < single - 0.03 and eot16 < single - 0.03
    assert min(eot8, eot16) < plain
