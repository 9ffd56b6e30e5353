"""Dataset-specific preprocessing defenses on real images: fundus field-of-view masking with local contrast
normalization (RetinaMNIST) and Shades-of-Gray colour constancy (ISIC 2017 dermoscopy).

Every expectation is measured on the images themselves (their corner colour, their p-norm illuminant,
their spread across images), not a stored result: a mask must cover what the pixels say is retina and
zero what the pixels say is background, and colour constancy must equalize what the p-norm measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medadv.attacks import PGD, ThreatModel
from medadv.defenses import PREPROCESSORS, DefendedModel, build_preprocessor, defend
from medadv.defenses.base import apply_preprocessor
from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from defense_support import _one_thread  # noqa: F401  (autouse fixture)

FOV, CC = "fundus-fov", "derm-color-constancy"


@pytest.fixture(scope="module")
def fundus(data_root):
    """RetinaMNIST (28 px, the size stored here): the 400 test images and the 120 validation images
    (the validation split holds fundus photos on a white background as well as on black)."""
    from medadv.data import load_split

    read = dict(data_root=data_root, size=28, download=False)
    return load_split("fundus-dr", "test", **read).stored(), load_split("fundus-dr", "val", **read).stored()


@pytest.fixture(scope="module")
def derm(data_root):
    """The 108 ISIC 2017 validation images (melanoma and nevus) at 64 px."""
    from medadv.data import load_split

    return load_split("derm-melanoma", "val", data_root=data_root, size=64, download=False).stored()


def background_statistics(x: torch.Tensor, k: int = 3):
    """Per image, from its pixels alone: each pixel's colour distance from the median colour of the four
    k×k corners (N×H×W) and that distance's 99th percentile (N)."""
    corners = torch.cat([x[..., :k, :k], x[..., :k, -k:], x[..., -k:, :k], x[..., -k:, -k:]], dim=-1)
    background = corners.flatten(2).median(dim=2).values
    distance = (x - background[:, :, None, None]).pow(2).mean(1).sqrt()
    return distance, torch.quantile(distance.flatten(1), 0.99, dim=1)


def radius(h: int, w: int) -> torch.Tensor:
    """H×W distance from the image centre, in units of the image side."""
    yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    return torch.hypot(yy, xx) / min(h, w)


def p_norm_means(x: torch.Tensor, p: float) -> torch.Tensor:
    """N×C (mean x^p)^(1/p) in float64, written independently of the defense."""
    return x.double().flatten(2).pow(p).mean(2).pow(1 / p)


def tiny_classifier(channels: int = 3, size: int = 28, seed: int = 0) -> MedicalClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    spec = ModelSpec(arch="tiny", input_size=size, data_channels=channels, net_channels=channels,
                     mean=(0.5,) * channels, std=(0.25,) * channels, task="fundus-dr",
                     class_names=("no referable DR", "referable DR"), threshold=0.5)
    return MedicalClassifier(net, spec).eval()


# ---- registry -------------------------------------------------------------------------------------------

def test_registered_names_settings_and_differentiability():
    assert PREPROCESSORS[FOV].differentiable and PREPROCESSORS[CC].differentiable
    assert build_preprocessor(FOV).params() == {"threshold": 0.1, "margin": 0.05, "gain": 4.0, "sigma": 0.05,
                                                "lcn": True}
    assert build_preprocessor(CC).params() == {"power": 6.0}
    for name, bad, match in [(FOV, {"threshold": 0}, "threshold"), (FOV, {"threshold": 1.5}, "threshold"),
                             (FOV, {"margin": 0.5}, "margin"), (FOV, {"gain": -1}, "gain"),
                             (FOV, {"sigma": 0}, "sigma"), (FOV, {"sigma": float("nan")}, "sigma"),
                             (FOV, {"lcn": "yes"}, "lcn"), (FOV, {"radius": 3}, "settings"),
                             (CC, {"power": 0.5}, "power"), (CC, {"power": True}, "power"),
                             (CC, {"power": float("inf")}, "power"), (CC, {"p": 6}, "settings")]:
        with pytest.raises(MedadvError, match=match):
            build_preprocessor(name, **bad)


@pytest.mark.parametrize("name, params", [(FOV, {"threshold": 0.15, "margin": 0.0, "gain": 3.0, "sigma": 0.1,
                                                 "lcn": False}),
                                          (FOV, {}), (CC, {"power": 2.0}), (CC, {})])
def test_registry_round_trip_and_defended_model(name, params, fundus, derm):
    pre = build_preprocessor(name, **params)
    record = json.loads(json.dumps(pre.to_json()))  # JSON-able, as a checkpoint stores it
    again = build_preprocessor(name, **{k: v for k, v in record.items() if k not in ("name", "differentiable")})
    assert again.to_json() == pre.to_json() == record and record["differentiable"] is True
    model = tiny_classifier()
    d = defend(model, [record])
    assert isinstance(d, DefendedModel) and d.fully_differentiable
    assert d.to_json()["defenses"][0] == pre.to_json()
    x = (fundus[0][:6] if name == FOV else derm[:6]).clone()
    with torch.no_grad():
        assert torch.equal(d(x), model(pre(x)))
    # differentiable: the defense is part of the graph, so naive and adaptive attackers get one gradient
    grads = []
    for adaptive in (False, True):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(d.with_adaptive(adaptive)(xr)[:, 1].sum(), xr)
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and grads[0].isfinite().all() and grads[0].abs().sum() > 0


@pytest.mark.parametrize("name", [FOV, CC])
def test_grey_and_random_inputs_keep_shape_range_and_attacks_run(name):
    """What the generic wrapper test asks of every registered defense (1-channel 8-bit noise)."""
    pre = build_preprocessor(name)
    x = torch.randint(0, 256, (4, 1, 28, 28), generator=torch.Generator().manual_seed(0)) / 255.0
    z = pre(x)
    assert z.shape == x.shape and z.min() >= 0 and z.max() <= 1 and z.isfinite().all()
    if name == CC:
        assert torch.equal(z, x)  # one channel has no colour cast to remove
    d = defend(tiny_classifier(channels=1), [pre.to_json()])
    for adaptive in (False, True):
        x_adv = PGD(ThreatModel(eps=4 / 255, steps=2))(d.with_adaptive(adaptive), x, torch.tensor([0, 1, 0, 1])).x_adv
        assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 4 / 255 + 1e-6


# ---- fundus field of view -------------------------------------------------------------------------------

def test_fov_mask_covers_the_disc_and_zeros_the_background_on_real_fundus(fundus):
    x = torch.cat(fundus)
    pre = build_preprocessor(FOV)
    mask = pre.fov_mask(x)
    assert mask.shape == (len(x), 1, 28, 28) and set(mask.unique().tolist()) <= {0.0, 1.0}
    m = mask[:, 0].bool()
    distance, scale = background_statistics(x)
    retina = distance > 0.3 * scale[:, None, None]  # clearly unlike the corners: what the pixels call retina
    # the disc is covered: all of the retina in the central region, nearly all of it anywhere
    central = radius(28, 28) < 0.4
    per_image = (m & retina).flatten(1).sum(1) / retina.flatten(1).sum(1)
    assert (m | ~(retina & central)).all()
    assert per_image.min() >= 0.95 and per_image.mean() >= 0.99, (per_image.min(), per_image.mean())
    # ... and not the background: the corners are outside every mask, and what lies outside (beyond the
    # rim the mask drops) looks like the corners, not like the retina inside
    assert not m[:, radius(28, 28) > 0.6].any()
    near = torch.nn.functional.max_pool2d(mask, 5, stride=1, padding=2)[:, 0].bool()
    outside = [(distance[i][~near[i]].mean() / distance[i][m[i]].mean()).item() for i in range(len(x))]
    assert max(outside) < 0.25 and float(np.median(outside)) < 0.1, (max(outside), np.median(outside))
    # the outputs: zero outside the mask in every channel; the masked image itself when lcn=False
    masked = build_preprocessor(FOV, lcn=False)(x)
    assert torch.equal(masked, x * mask)
    for out in (pre.normalize(x, mask), masked):
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert (out * (1 - mask) == 0).all()


def test_fov_mask_works_on_white_backgrounds_and_ignores_corner_marks(fundus):
    test, val = fundus
    pre = build_preprocessor(FOV)
    corners = radius(28, 28) > 0.6
    lum = torch.cat([test, val]).mean(1)
    white = lum[:, corners].mean(1) > 0.8  # selected by their pixels: photos on a white background
    marked = (lum[:, corners].amax(1) > 0.1) & ~white  # a bright mark in a dark corner
    assert white.sum() >= 1 and marked.sum() >= 1
    for sel in (white, marked):
        x = torch.cat([test, val])[sel]
        out = pre(x)
        assert (out[:, :, corners] == 0).all()  # the white background and the marks are gone
        # the disc is kept: the mask covers what the pixels call retina (the marks aside)
        distance, scale = background_statistics(x)
        retina = (distance > 0.3 * scale[:, None, None]) & ~corners
        m = pre.fov_mask(x)[:, 0].bool()
        assert ((m & retina).flatten(1).sum(1) / retina.flatten(1).sum(1)).min() >= 0.95


def test_fov_mask_is_not_notched_by_a_dark_lesion_at_the_rim(fundus):
    """The aperture is convex: a dark spot on the retina that reaches the rim stays inside the field of view."""
    pre = build_preprocessor(FOV, margin=0.0)
    x = fundus[0]
    before = pre.fov_mask(x)
    # per image, the last column inside the mask on all of rows 12-15 (1-based): the rim on the right;
    # only images where that rim is the aperture's, not the frame's (a disc cut by the frame has no rim)
    rim = (before[:, 0, 12:16] * torch.arange(1, 29)).amax(2).amin(1).long()
    chosen = torch.nonzero(rim <= 26)[:, 0]
    assert len(chosen) >= 5
    spotted = x[chosen].clone()
    for j, c in enumerate(rim[chosen].tolist()):
        spotted[j, :, 12:16, c - 5:c] = 0  # 4×5 px as dark as the background, reaching the rim
    lost = (before[chosen] - pre.fov_mask(spotted)).clamp_min(0).flatten(1).sum(1)
    assert lost.max() <= 4, lost  # a few rim pixels at most, not the 20 px spot


def test_fov_mask_is_stable_across_resolution(data_root, fundus):
    """The same photographs read at 56 px (the loader upsamples the 28 px file) get the same field of view."""
    from medadv.data import load_split

    big = load_split("fundus-dr", "test", data_root=data_root, size=56, file_size=28, download=False).stored(
        np.arange(40))
    pre = build_preprocessor(FOV)
    small = torch.nn.functional.interpolate(pre.fov_mask(fundus[0][:40]), size=56, mode="nearest").bool()
    large = pre.fov_mask(big).bool()
    iou = (small & large).flatten(1).sum(1) / (small | large).flatten(1).sum(1)
    assert iou.min() >= 0.85, iou.min()


def test_local_contrast_normalization_removes_illumination_on_real_fundus(fundus):
    x = fundus[0]
    pre = build_preprocessor(FOV)
    mask = pre.fov_mask(x)
    out = pre.normalize(x, mask)
    assert torch.equal(out, pre(x))

    def fov_means(t: torch.Tensor) -> torch.Tensor:
        return (t * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) * t.shape[1])

    before, after = fov_means(x), fov_means(out)
    # the photos differ widely in brightness; after LCN every FOV sits at the mid-grey 0.5 ...
    assert before.std() > 10 * after.std() and (after - 0.5).abs().max() < 0.05, (before.std(), after.std())
    # ... because the local mean is subtracted: a constant illumination offset changes nothing
    assert torch.allclose(pre.normalize(x + 0.1, mask), out, atol=1e-5)
    # and the local structure is kept, amplified by the gain (the output is not flat)
    assert ((out - 0.5) * mask).abs().sum() / mask.sum() > ((x - x.mean()) * mask).abs().sum() / mask.sum() * 0.2


def test_fov_gradient_is_exact_given_the_mask_zero_outside_and_finite(fundus):
    pre = build_preprocessor(FOV)
    x = fundus[0][:3].double()
    mask = pre.fov_mask(x)
    xr = x.clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (g,) = torch.autograd.grad((pre(xr) * w).sum(), xr)
    assert g.isfinite().all()
    inside = mask.expand_as(g).bool()
    assert (g[~inside] == 0).all() and (g[inside] != 0).float().mean() > 0.5
    # the mask is a constant of the input: the gradient through pre is the one through normalize(., mask)
    (g_fixed,) = torch.autograd.grad((pre.normalize(xr, mask) * w).sum(), xr)
    assert torch.equal(g, g_fixed)
    # and it is the true derivative: finite differences along random directions (the mask does not move)
    assert torch.autograd.gradcheck(pre, (x.clone().requires_grad_(True),), fast_mode=True, eps=1e-6, atol=1e-5)


# ---- dermoscopy colour constancy ------------------------------------------------------------------------

def reference_shades_of_gray(img: np.ndarray, power: float) -> np.ndarray:
    """The widely used ISIC implementation, for one H×W×3 image in [0, 1] (written independently)."""
    rgb = np.power(np.mean(np.power(img, power), axis=(0, 1)), 1 / power)
    rgb = rgb / np.sqrt(np.sum(rgb ** 2))
    return np.clip(img * (1 / (rgb * np.sqrt(3))), 0, 1)


def test_color_constancy_matches_the_reference_and_equalizes_p_norms_on_real_dermoscopy(derm):
    x = derm
    for power in (6.0, 1.0):
        pre = build_preprocessor(CC, power=power)
        out = pre(x)
        assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
        ref = np.stack([reference_shades_of_gray(img.permute(1, 2, 0).double().numpy(), power) for img in x])
        assert np.allclose(out.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
        e_in, e_out = p_norm_means(x, power), p_norm_means(out, power)
        spread_in = e_in.max(1).values / e_in.min(1).values - 1
        spread_out = e_out.max(1).values / e_out.min(1).values - 1
        clipped = (out >= 1).flatten(1).any(1)
        # dermoscopy photos carry a colour cast (the p-norm means differ between channels) ...
        assert spread_in.median() > 0.1, spread_in.median()
        # ... which is gone: equal channel p-norm means where nothing clips, nearly so where little does
        assert (~clipped).sum() >= len(x) // 2
        assert spread_out[~clipped].max() < 1e-4 and spread_out.median() < 1e-4, spread_out.max()
        assert (spread_out <= 0.2 * spread_in).all()
        # the common level is the input's overall level ‖e‖/√C
        assert torch.allclose(e_out[~clipped].mean(1), e_in[~clipped].norm(dim=1) / math.sqrt(3), rtol=1e-4)


def test_color_constancy_undoes_a_color_cast_on_real_dermoscopy(derm):
    x = derm
    pre = build_preprocessor(CC)
    cast = torch.tensor([1.0, 0.85, 0.7])[None, :, None, None]  # a warmer light (no pixel clips)
    a, b = pre(x), pre(x * cast)
    ok = ((a < 1) & (b < 1)).all(1, keepdim=True) & (a.sum(1, keepdim=True) > 0.05)
    chroma_a = a / a.sum(1, keepdim=True).clamp_min(1e-6)
    chroma_b = b / b.sum(1, keepdim=True).clamp_min(1e-6)
    diff = (chroma_a - chroma_b).abs()[ok.expand_as(a)]
    before = (x / x.sum(1, keepdim=True).clamp_min(1e-6) - x * cast / (x * cast).sum(1, keepdim=True).clamp_min(1e-6))
    assert ok.float().mean() > 0.9 and diff.max() < 1e-4 and before.abs().max() > 0.05, diff.max()


def test_color_constancy_gradient_is_finite_nonzero_and_exact(derm):
    pre = build_preprocessor(CC)
    x = derm[:2, :, :24, :24].double()
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((apply_preprocessor(pre, xr, adaptive=False) * x).sum(), xr)
    assert g.isfinite().all() and (g != 0).float().mean() > 0.9
    # the illuminant estimate is part of the gradient (not a constant gain): finite differences agree
    assert torch.autograd.gradcheck(pre, (xr,), fast_mode=True, eps=1e-6, atol=1e-6)
    black = torch.zeros(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)  # an all-black image
    (gb,) = torch.autograd.grad(pre(black).sum(), black)
    assert gb.isfinite().all()


# ---- both -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [FOV, CC])
def test_deterministic_per_image_and_dtype_preserving(name, fundus, derm):
    pre = build_preprocessor(name)
    x = fundus[0][:16] if name == FOV else derm[:16]
    out = pre(x)
    assert torch.equal(out, pre(x.clone()))  # same input, same output
    # each image is processed on its own: a batch changes nothing
    alone = torch.cat([pre(x[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(out, alone, atol=1e-6)
    out64 = pre(x.double())
    assert out64.dtype == torch.float64 and torch.allclose(out64.float(), out, atol=1e-5)
