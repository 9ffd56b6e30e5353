"""Preprocessing defenses: a defended model is still a model, every attack runs on it, and a
non-differentiable defense that looks strong to a naive attack falls under BPDA; the gradient-masking
checks flag a model that rounds its input and pass a plain one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medadv.attacks import FGSM, PGD, Square, ProbabilityOracle, ThreatModel
from medadv.defenses import PREPROCESSORS, DefendedModel, build_preprocessor, defend
from medadv.defenses.masking import check_gradient_masking
from medadv.errors import MedadvError
from defense_support import _one_thread, tiny_classifier  # noqa: F401  (_one_thread: autouse fixture)


@pytest.fixture(scope="module")
def trained(data_root):
    """A tiny CNN trained for ~2 s on 400 real PneumoniaMNIST images; 100 test images."""
    from medadv.data import load_split

    read = dict(data_root=data_root, source="medmnist:pneumoniamnist", size=28)
    train, test = load_split("chest-xray", "train", **read), load_split("chest-xray", "test", **read)
    rng = np.random.default_rng(0)
    i = np.sort(rng.permutation(len(train))[:400])
    x, y = train.tensor(i), torch.from_numpy(train.labels[i])
    model = tiny_classifier(threshold=0.4)
    model.spec.threshold = 0.5
    model.train()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run outside _one_thread
    try:
        for _ in range(30):
            for b in range(0, len(x), 50):
                opt.zero_grad()
                F.cross_entropy(model(x[b:b + 50]), y[b:b + 50]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    j = np.sort(rng.permutation(len(test))[:100])
    return model, test.tensor(j), torch.from_numpy(test.labels[j])


def accuracy(model, x, y) -> float:
    return float((torch.from_numpy(model.predict(model.probabilities(x))) == y).float().mean())


def test_registry_has_the_five_defenses_and_rejects_unknown_ones():
    assert {"bit-depth", "median", "jpeg", "gaussian", "histeq"} <= set(PREPROCESSORS)
    assert {n: PREPROCESSORS[n].differentiable for n in ("bit-depth", "jpeg", "histeq", "median", "gaussian")} == {
        "bit-depth": False, "jpeg": False, "histeq": False, "median": True, "gaussian": True}
    with pytest.raises(MedadvError, match="unknown defense"):
        build_preprocessor("nope")
    with pytest.raises(MedadvError, match="quality"):
        build_preprocessor("jpeg", quality=0)
    with pytest.raises(MedadvError, match="settings"):
        build_preprocessor("median", width=3)


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_wrapper_keeps_shapes_threshold_and_range(name):
    model = tiny_classifier(threshold=0.4)
    x = torch.randint(0, 256, (4, 1, 28, 28)) / 255.0  # on the 8-bit grid, as stored images are
    pre = build_preprocessor(name)
    z = pre(x)
    assert z.shape == x.shape and z.min() >= 0 and z.max() <= 1
    d = defend(model, [pre.to_json()])  # rebuilt from its JSON record, as a checkpoint would
    assert d.to_json()["defenses"][0] == pre.to_json()
    assert d(x).shape == (4, 2) and d.threshold == model.threshold == 0.4 and d.spec is model.spec
    assert d.probabilities(x).shape == (4,) and d.predict(np.array([0.39, 0.4])).tolist() == [0, 1]
    # every white-box attack runs on it unchanged and stays inside the threat model
    threat = ThreatModel(eps=4 / 255, steps=2)
    for adaptive in (False, True):
        x_adv = PGD(threat)(d.with_adaptive(adaptive), x, torch.tensor([0, 1, 0, 1])).x_adv
        assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 4 / 255 + 1e-6


def test_black_box_and_fast_path_attacks_apply_to_a_defended_model():
    d = defend(tiny_classifier(threshold=0.4), ["jpeg", "bit-depth"], adaptive=True)
    x, y = torch.randint(0, 256, (3, 1, 28, 28)) / 255.0, torch.tensor([0, 1, 1])
    r = Square(ThreatModel(eps=8 / 255, steps=5), seed=0, max_queries=20)(ProbabilityOracle.from_model(d), x, y)
    assert r.x_adv.shape == x.shape and r.queries is not None
    # the accelerated copy keeps the whole pipeline (a DefendedModel is not rebuilt around .network)
    a = FGSM(ThreatModel(eps=8 / 255), fast="fp32")(d, x, y).x_adv
    b = FGSM(ThreatModel(eps=8 / 255))(d, x, y).x_adv
    assert torch.allclose(a, b)


def test_masked_gradient_is_zero_and_bpda_passes_it_through():
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    for adaptive, expect_zero in ((False, True), (True, False)):
        pre = build_preprocessor("bit-depth", bits=3)
        from medadv.defenses.base import apply_preprocessor

        (g,) = torch.autograd.grad(apply_preprocessor(pre, x, adaptive).sum(), x)
        assert bool((g == 0).all()) == expect_zero
        if adaptive:  # identity BPDA
            assert torch.equal(g, torch.ones_like(g))
    # histogram equalization's BPDA is a smooth CDF: positive slope, larger where grey levels are dense
    he = build_preprocessor("histeq")
    xs = torch.cat([torch.full((1, 1, 14, 28), 0.3), torch.rand(1, 1, 14, 28)], dim=2)
    (g,) = torch.autograd.grad(apply_preprocessor(he, xs.requires_grad_(True), True).sum(), xs)
    assert (g > 0).all() and g[0, 0, :14].mean() > g[0, 0, 14:].mean()


def test_nonadaptive_looks_strong_and_bpda_breaks_it(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean >= 0.75
    threat = ThreatModel(eps=8 / 255, steps=10, target="none")
    undefended = accuracy(model, PGD(threat)(model, x, y).x_adv, y)
    for name in ("bit-depth", "jpeg"):
        d = defend(model, name)
        d_clean = accuracy(d, x, y)
        naive = accuracy(d, PGD(threat)(d, x, y).x_adv, y)  # masked gradient: PGD is lost
        adaptive = accuracy(d, PGD(threat)(d.with_adaptive(True), x, y).x_adv, y)  # BPDA
        assert naive >= d_clean - 0.05, (name, naive, d_clean)
        assert naive - adaptive >= 0.3, (name, naive, adaptive)
        assert adaptive <= undefended + 0.2, (name, adaptive, undefended)


class Rounding(nn.Module):
    """A deliberately masked model: rounds its input to 8 levels with no BPDA path (gradient zero)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.threshold = model.threshold

    def forward(self, x):
        return self.model(torch.round(x * 7) / 7)


def test_masking_check_flags_the_rounding_model_and_passes_a_plain_one(trained):
    model, x, y = trained
    plain = check_gradient_masking(model, x, y, black_box_queries=50)
    assert not plain.flagged, plain.to_json()
    masked = check_gradient_masking(Rounding(model), x, y, black_box_queries=50)
    status = {c.name: c.status for c in masked.checks}
    assert masked.flagged and status["gradients"] == "warn" and status["unbounded"] == "warn", masked.to_json()
    # the same rounding behind medadv's wrapper: flagged non-adaptively, clean under BPDA
    assert check_gradient_masking(defend(model, "bit-depth"), x, y, black_box_queries=0).flagged
    assert not check_gradient_masking(defend(model, "bit-depth", adaptive=True), x, y, black_box_queries=0).flagged


def test_masking_check_rejects_bad_input():
    with pytest.raises(MedadvError, match="N×C×H×W"):
        check_gradient_masking(tiny_classifier(threshold=0.4), torch.rand(2, 28, 28), torch.tensor([0, 1]))


def test_a_defended_model_needs_a_defense():
    with pytest.raises(MedadvError, match="at least one"):
        DefendedModel(tiny_classifier(threshold=0.4), [])


class Noisy(nn.Module):
    """A randomized model (noise on the input at every pass): needs EOT, which the checks must say."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.threshold = model.threshold

    def forward(self, x):
        return self.model(x + 0.01 * torch.randn_like(x))


def test_masking_check_detects_randomness(trained):
    model, x, y = trained
    report = check_gradient_masking(Noisy(model), x[:20], y[:20], black_box_queries=0, steps=2)
    assert {c.name: c.status for c in report.checks}["randomness"] == "warn" and report.flagged


def test_defended_checkpoint_round_trip(tmp_path):
    from medadv.defenses.checkpoint import load_defended, save_defended
    from medadv.models import load_checkpoint, save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    d = defend(model, [{"name": "jpeg", "quality": 60}, "median"])
    save_defended(d, tmp_path / "ck", {"task": "chest-xray"})
    loaded, meta = load_defended(tmp_path / "ck")
    assert isinstance(loaded, DefendedModel) and meta["defense"] == d.to_json()
    assert [p.to_json() for p in loaded.defenses] == [p.to_json() for p in d.defenses] and not loaded.adaptive
    assert load_defended(tmp_path / "ck", adaptive=True)[0].adaptive
    x = torch.randint(0, 256, (2, 1, 28, 28)) / 255.0
    assert torch.allclose(loaded(x), d(x), atol=1e-5)
    bare, _ = load_checkpoint(tmp_path / "ck")  # a loader that knows no defenses still gets the network
    assert not isinstance(bare, DefendedModel)
    save_checkpoint(model, tmp_path / "plain", {"task": "chest-xray"})
    assert not isinstance(load_defended(tmp_path / "plain")[0], DefendedModel)


def test_feature_squeezing_detects_naive_pgd_and_the_adaptive_attack_evades_it(trained, data_root):
    from medadv.data import load_split
    from medadv.defenses.detect import FeatureSqueezing, adaptive_attack

    model, x, y = trained
    val = load_split("chest-xray", "val", data_root=data_root, source="medmnist:pneumoniamnist", size=28)
    det = FeatureSqueezing(model)
    with pytest.raises(MedadvError, match="threshold"):
        det.flags(x)
    det.calibrate(val.tensor(slice(0, 200)), 0.05)
    assert float(det.flags(val.tensor(slice(0, 200))).float().mean()) <= 0.05 + 1 / 200  # by construction
    threat = ThreatModel(eps=8 / 255, steps=10, target="none")

    def outcome(x_adv):
        fooled = torch.from_numpy(model.predict(model.probabilities(x_adv))) != y
        flagged = det.flags(x_adv)
        return fooled, float(flagged[fooled].float().mean()), int((fooled & ~flagged).sum())

    fooled, detected, evaded = outcome(PGD(threat)(model, x, y).x_adv)
    assert fooled.float().mean() > 0.5 and detected > 0.4  # the detector catches much of the naive attack
    _, detected_adaptive, evaded_adaptive = outcome(adaptive_attack(det, x, y, threat))
    assert detected_adaptive < detected - 0.15 and evaded_adaptive > evaded
