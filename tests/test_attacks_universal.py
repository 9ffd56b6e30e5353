"""Universal attacks: a UAP is one on-grid delta within eps and the mask, the same for every image; a patch
changes one square of the requested area and nothing else; both are seeded and survive state() /
from_state(); on the real chest model both beat random noise / a random patch of the same size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from medadv.attacks.patch import AdversarialPatch, patch_side, place
from medadv.attacks.threat_model import ThreatModel
from medadv.attacks.uap import UniversalPerturbation
from medadv.errors import MedadvError

L = 255


def tiny_net(channels: int) -> nn.Module:
    """A random-weight conv net with N×2 logits, fixed by its seed."""
    torch.manual_seed(channels)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 2))


def grid_images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, L + 1, (n, c, h, w), generator=g).float() / L
    x[0, :, 0, 0] = 0.0  # both clip ends present, so clipping is exercised
    x[0, :, 0, 1] = 1.0
    return x


def levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * L).long()


threats = st.builds(
    lambda norm, k, frac, target, masked: dict(norm=norm, eps=(k + frac) / L if norm == "linf" else (k + frac) / 40,
                                               target=target, masked=masked),
    st.sampled_from(["linf", "l2"]), st.integers(0, 12), st.sampled_from([0.0, 0.5]),
    st.sampled_from(["opposite", "disease", "healthy", "none"]), st.booleans(),
)


def make_threat(spec: dict, h: int, w: int, seed: int) -> ThreatModel:
    mask = None
    if spec["masked"]:
        mask = (torch.rand((h, w), generator=torch.Generator().manual_seed(seed + 1)) < 0.5).float()
    return ThreatModel(norm=spec["norm"], eps=spec["eps"], target=spec["target"], mask=mask)


# -- UAP ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(spec=threats, c=st.sampled_from([1, 3]), h=st.integers(4, 12), w=st.integers(4, 12), seed=st.integers(0, 999))
def test_uap_is_one_on_grid_delta_within_eps_and_mask(spec, c, h, w, seed):
    threat = make_threat(spec, h, w, seed)
    net = tiny_net(c)
    x_fit, x = grid_images(12, c, h, w, seed), grid_images(5, c, h, w, seed + 7)
    y_fit, y = torch.arange(12) % 2, torch.arange(5) % 2
    attack = UniversalPerturbation(threat, seed, steps=4, batch_size=5, step_size=threat.radius / 2 + 1e-3)
    x_adv = attack.fit(net, x_fit, y_fit)(net, x, y).x_adv

    delta = levels(attack.state()["delta"])
    assert delta.shape == (c, h, w)
    assert torch.equal(x_adv, levels(x_adv).float() / L) and x_adv.min() >= 0 and x_adv.max() <= 1
    # every image gets the same delta, clipped at the pixel range only
    assert torch.equal(levels(x_adv), (levels(x) + delta).clamp(0, L))
    change = levels(x_adv) - levels(x)
    if threat.norm == "linf":
        assert change.abs().max() <= math.floor(threat.eps * L + 1e-6)
    else:
        assert (change.flatten(1).float().norm(dim=1) / L).max() <= threat.eps + 1e-6
    if threat.mask is not None:
        assert (change[:, :, threat.mask == 0] == 0).all()


@settings(max_examples=10, deadline=None)
@given(spec=threats, seed=st.integers(0, 2**31 - 1))
def test_uap_is_seeded_and_round_trips_through_its_state(spec, seed):
    threat = make_threat(spec, 8, 8, seed)
    net = tiny_net(1)
    x_fit, x, y = grid_images(20, 1, 8, 8, 1), grid_images(6, 1, 8, 8, 2), torch.arange(6) % 2
    a = UniversalPerturbation(threat, seed, steps=3, batch_size=8).fit(net, x_fit, torch.arange(20) % 2)
    b = UniversalPerturbation(threat, seed, steps=3, batch_size=8).fit(net, x_fit, torch.arange(20) % 2)
    assert torch.equal(a.state()["delta"], b.state()["delta"])
    assert torch.equal(a(net, x, y).x_adv, b(net, x, y).x_adv)
    c = UniversalPerturbation.from_state(threat, a.state(), seed)
    assert torch.equal(c(nn.Identity(), x, y).x_adv, a(net, x, y).x_adv)  # the victim is never queried


def test_uap_fits_the_training_images_and_explains_misuse():
    net = tiny_net(1)
    x, y = grid_images(32, 1, 8, 8, 0), torch.zeros(32, dtype=torch.long)
    threat = ThreatModel(eps=16 / 255, target="disease")
    with pytest.raises(MedadvError, match="not been fitted"):
        UniversalPerturbation(threat)(net, x, y)
    attack = UniversalPerturbation(threat, steps=30, batch_size=8).fit(net, x, y)
    with torch.no_grad():
        before = net(x).argmax(1).eq(1).float().mean()
        after = net(attack(net, x, y).x_adv).argmax(1).eq(1).float().mean()
    assert after >= before  # ascent on a random net moves toward the target, never away
    with pytest.raises(MedadvError, match="fitted on 1×8×8"):
        attack(net, grid_images(2, 1, 9, 9, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(MedadvError, match="lacks delta"):
        UniversalPerturbation.from_state(threat, {})


# -- patch ----------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(c=st.sampled_from([1, 3]), h=st.integers(8, 32), w=st.integers(8, 32), fraction=st.floats(0.02, 0.3),
       masked=st.booleans(), seed=st.integers(0, 999))
def test_patch_changes_one_square_of_the_requested_area_only(c, h, w, fraction, masked, seed):
    mask = (torch.rand((h, w), generator=torch.Generator().manual_seed(seed)) < 0.7).float() if masked else None
    threat = ThreatModel(target="healthy", mask=mask)
    net = tiny_net(c)
    x = grid_images(6, c, h, w, seed)
    attack = AdversarialPatch(threat, seed, patch_fraction=fraction, steps=2, batch_size=4)
    result = attack.fit(net, grid_images(8, c, h, w, seed + 1), torch.arange(8) % 2)(net, x, torch.ones(6).long())
    patch, x_adv = attack.state()["patch"], result.x_adv

    s = patch_side(fraction, h, w)
    assert patch.shape == (c, s, s)
    # the requested area, unless a square that large does not fit: then the largest that does (8x31 at 0.3)
    assert abs(s * s - fraction * h * w) <= math.sqrt(fraction * h * w) + 1 or s == min(h, w) < math.sqrt(fraction * h * w)
    assert torch.equal(x_adv, levels(x_adv).float() / L)
    for i, (r, q) in enumerate(result.info["location"].tolist()):
        box = torch.zeros(h, w, dtype=torch.bool)
        box[r:r + s, q:q + s] = True
        may = box if mask is None else box & (mask > 0)
        assert torch.equal(x_adv[i][:, ~may], x[i][:, ~may])  # nothing outside the square (and the mask)
        assert torch.equal(x_adv[i][:, may], patch[:, may[r:r + s, q:q + s]])  # the patch, pixel for pixel
        changed = (x_adv[i] != x[i]).any(0).sum().item()
        assert changed <= may.sum() and changed >= 0.5 * may.sum() - 1  # random images rarely match the patch


def test_patch_is_seeded_round_trips_and_moves_with_the_application_seed():
    net = tiny_net(1)
    x_fit, y_fit = grid_images(16, 1, 20, 20, 0), torch.arange(16) % 2
    x, y = grid_images(8, 1, 20, 20, 1), torch.arange(8) % 2
    threat = ThreatModel(target="none")
    a = AdversarialPatch(threat, 5, steps=3, batch_size=8).fit(net, x_fit, y_fit)
    b = AdversarialPatch(threat, 5, steps=3, batch_size=8).fit(net, x_fit, y_fit)
    assert torch.equal(a.state()["patch"], b.state()["patch"])
    assert torch.equal(a(net, x, y).x_adv, b(net, x, y).x_adv)
    c = AdversarialPatch.from_state(threat, a.state(), 5)
    assert torch.equal(c(nn.Identity(), x, y).x_adv, a(net, x, y).x_adv)
    c.seed = 6  # the runner gives each batch its own seed: a new draw of locations
    assert not torch.equal(c(net, x, y).info["location"], a(net, x, y).info["location"])
    with pytest.raises(MedadvError, match="does not fit"):
        c(net, grid_images(2, 1, 4, 4, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(MedadvError, match="patch_fraction"):
        AdversarialPatch(threat, patch_fraction=0.0)


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 8), r=st.integers(0, 8), q=st.integers(0, 8), c=st.sampled_from([1, 3]))
def test_training_placement_matches_pasting_upright_and_keeps_area_when_rotated(s, r, q, c):
    patch = torch.rand((1, c, s, s), generator=torch.Generator().manual_seed(s))
    shape = torch.Size([1, c, 16, 16])
    image, coverage = place(patch, shape, torch.tensor([[r + s / 2, q + s / 2]]), torch.tensor([float(s)]),
                            torch.tensor([0.0]))
    pasted, box = torch.zeros(shape), torch.zeros(16, 16)
    pasted[0, :, r:r + s, q:q + s] = patch[0]
    box[r:r + s, q:q + s] = 1
    assert torch.allclose(image, pasted, atol=1e-5) and torch.allclose(coverage[0, 0], box, atol=1e-5)
    if s >= 3:  # rotating moves pixels but keeps the patch's area (sampling blurs its edge a little)
        _, rotated = place(patch, torch.Size([1, c, 32, 32]), torch.tensor([[16.0, 16.0]]), torch.tensor([float(s)]),
                           torch.tensor([0.6]))
        assert abs(rotated.sum().item() - s * s) <= 0.35 * s * s


# -- the real chest model ---------------------------------------------------------------------------------


def toward(model, x: torch.Tensor, target: int) -> np.ndarray:
    return model.predict(model.probabilities(x)) == target


@pytest.fixture(scope="module")
def chest_fit(data_root):
    from medadv.data import load_split

    train = load_split("chest-xray", "train", data_root=data_root)
    idx = np.random.default_rng(0).choice(len(train), 256, replace=False)
    return train.tensor(idx), torch.from_numpy(train.labels[idx])


def test_uap_and_patch_flip_unseen_chest_xrays_far_more_than_random(chest_model, chest_test, chest_fit):
    _, model, _ = chest_model
    model.eval()
    x_fit, y_fit = chest_fit
    x = chest_test.tensor(np.arange(0, len(chest_test), 2))  # 312 unseen test images
    y = torch.from_numpy(chest_test.labels[::2])
    healthy = 0
    away = ~toward(model, x, healthy)  # predicted disease before the attack: the ones to flip

    threat = ThreatModel(eps=8 / 255, target="healthy")
    uap = UniversalPerturbation(threat, 0, steps=40, batch_size=32).fit(model, x_fit, y_fit)
    flip_uap = toward(model, uap(model, x, y).x_adv, healthy)[away].mean()
    noise = (torch.randint(0, 2, x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1) * threat.radius
    flip_noise = toward(model, (x + noise).clamp(0, 1), healthy)[away].mean()
    print(f"uap toward healthy: {flip_uap:.2f} of {away.sum()} flipped; random sign noise {flip_noise:.2f}")
    assert flip_uap >= 0.45 and flip_uap >= flip_noise + 0.15  # measured 0.64 vs 0.36

    # the patch toward "healthy" (as in the battery: a small square cannot paint diffuse pneumonia),
    # judged against a random patch of the same size, which already hides some of the lesion
    threat = ThreatModel(target="healthy")
    patch = AdversarialPatch(threat, 0, steps=60, batch_size=32).fit(model, x_fit, y_fit)
    flip_patch = toward(model, patch(model, x, y).x_adv, healthy)[away].mean()
    noise = torch.rand(patch.state()["patch"].shape, generator=torch.Generator().manual_seed(0))
    flip_random = toward(model, AdversarialPatch.from_state(threat, {"patch": noise})(model, x, y).x_adv,
                         healthy)[away].mean()
    print(f"patch toward healthy: {flip_patch:.2f} of {away.sum()} flipped; random patch {flip_random:.2f}")
    assert flip_patch >= 0.5 and flip_patch >= flip_random + 0.1  # measured 0.65 vs 0.46 (3-epoch model)
