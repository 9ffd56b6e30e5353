"""Randomized smoothing: Cohen et al.'s CERTIFY and PREDICT (radius formula, Clopper-Pearson bound,
abstention, seeding) and the `medadv certify` command (results.json, one-line errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from medadv.cli import main
from medadv.defenses.smoothing import (ABSTAIN, Certificate, Smoothed, certified_accuracy, certified_radius,
                                       image_generator, lower_confidence_bound)
from medadv.errors import MedadvError
from defense_support import _one_thread  # noqa: F401  (autouse fixture)


class Fixed(nn.Module):
    """A base classifier with a known probability under noise: P(disease) = 1 where the noisy image's
    first pixel is above ``cut``, so the count of 'disease' among n samples is Binomial(n, P(N(x0, σ²) > cut))."""

    def __init__(self, cut: float = 0.5) -> None:
        super().__init__()
        self.cut = cut
        self.threshold = 0.5
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        d = (x.flatten(1)[:, 0] > self.cut).float() * 20 - 10
        return torch.stack([-d, d], dim=1) / 2


def test_clopper_pearson_and_radius_by_hand():
    # k = n: the exact one-sided lower bound is alpha**(1/n) (the Beta(n, 1) quantile)
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    # radius = sigma * Phi^-1(p_lower): Phi^-1(0.975) = 1.959964
    assert certified_radius(0.975, 0.25) == pytest.approx(0.25 * 1.959964, abs=1e-6)
    assert certified_radius(0.5, 0.25) == 0.0 and certified_radius(0.3, 0.25) == 0.0
    try:  # Cohen et al.'s code: statsmodels' two-sided beta interval at 2·alpha
        from statsmodels.stats.proportion import proportion_confint
    except ImportError:
        return
    assert lower_confidence_bound(870, 1000, 0.001) == pytest.approx(
        proportion_confint(870, 1000, alpha=0.002, method="beta")[0], rel=1e-9)


def test_certify_certifies_a_sure_image_with_the_hand_computed_radius():
    s = Smoothed(Fixed(cut=0.5), sigma=0.1, batch_size=64)
    x = torch.full((1, 4, 4), 0.95)  # 4.5 sigma above the cut: every noisy copy is 'disease'
    c = s.certify(x, n0=20, n=200, alpha=0.001, generator=image_generator(0, 0))
    p_lower = 0.001 ** (1 / 200)
    from scipy.stats import norm

    assert c.prediction == 1 and c.count == 200
    assert c.p_lower == pytest.approx(p_lower) and c.radius == pytest.approx(0.1 * norm.ppf(p_lower))
    assert c.radius_levels == pytest.approx(255 * c.radius)


def test_certify_abstains_near_the_decision_boundary_and_predict_too():
    s = Smoothed(Fixed(cut=0.5), sigma=0.25, batch_size=100)
    x = torch.full((1, 4, 4), 0.5)  # P = 1/2 under noise: no class can be certified
    c = s.certify(x, n0=50, n=400, alpha=0.001, generator=image_generator(0, 1))
    assert c.prediction == ABSTAIN and c.radius == 0.0 and c.p_lower < 0.5
    assert s.predict(x, n=400, alpha=0.001, generator=image_generator(0, 1)) == ABSTAIN
    far = torch.full((1, 4, 4), 0.0)  # 2 sigma below: healthy with P ~ 0.977
    assert s.predict(far, n=400, alpha=0.001, generator=image_generator(0, 2)) == 0
    c = s.certify(far, n0=50, n=400, alpha=0.001, generator=image_generator(0, 2))
    # p_A ~ Phi(2): the certified radius is below the true sigma*2 and close to it
    assert c.prediction == 0 and 0.25 * 1.3 < c.radius < 0.25 * 2


def test_certify_is_seeded_and_batch_size_only_changes_speed_not_validity():
    s = Smoothed(Fixed(cut=0.5), sigma=0.25, batch_size=50)
    x = torch.full((1, 4, 4), 0.3)
    a = s.certify(x, 20, 300, 0.01, image_generator(7, 3))
    b = s.certify(x, 20, 300, 0.01, image_generator(7, 3))
    c = s.certify(x, 20, 300, 0.01, image_generator(8, 3))
    assert a == b and a.count != c.count  # another seed, another draw


def test_certified_accuracy_counts_abstentions_as_wrong():
    certs = [Certificate(1, 0.3, 0, 0.9, 0, 0), Certificate(0, 0.1, 0, 0.7, 0, 0),
             Certificate(ABSTAIN, 0.0, 0, 0.4, 0, 0), Certificate(0, 0.5, 0, 0.99, 0, 0)]
    rows = certified_accuracy(certs, np.array([1, 0, 0, 1]), [0.0, 0.2, 0.4])
    assert [r["certified_accuracy"] for r in rows] == [0.5, 0.25, 0.0]


@pytest.mark.parametrize("kwargs,needle", [({"sigma": 0}, "--sigma"), ({"sigma": -1}, "--sigma")])
def test_smoothed_rejects_bad_sigma(kwargs, needle):
    with pytest.raises(MedadvError, match=needle):
        Smoothed(Fixed(), **kwargs)


# ------------------------------------------------------------------------------------------ the CLI

def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained ResNet-18 checkpoint (28 px) on PneumoniaMNIST: certify needs a loadable model, not a good one."""
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    path = tmp_path_factory.mktemp("m") / "ck"
    save_checkpoint(model, path, {"task": "chest-xray", "seed": 0,
                                  "data": {"source": "medmnist:pneumoniamnist", "image_size": 28, "split_seed": 0}})
    return path


def test_cli_certify_writes_results_json(checkpoint, data_root, tmp_path, capsys):
    out = tmp_path / "cert"
    argv = ["certify", "--model", str(checkpoint), "--sigma", "0.25", "--n", "40", "--n0", "10", "--alpha", "0.01",
            "--out", str(out), "--limit", "6", "--seed", "3", "--batch-size", "25", "--data-root", str(data_root), "-q"]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    record = json.loads((out / "results.json").read_text())
    assert record["settings"] | {"sigma": 0.25, "n": 40, "n0": 10, "alpha": 0.01, "seed": 3} == record["settings"]
    assert record["summary"]["n_images"] == len(record["images"]) == 6
    assert record["levels"] == 255 and record["settings"]["sigma_levels"] == pytest.approx(0.25 * 255)
    for im in record["images"]:
        assert im["abstained"] == (im["prediction"] == -1)
        if not im["abstained"]:
            assert im["radius"] == pytest.approx(0.25 * __import__("scipy").stats.norm.ppf(im["p_lower"]))
            assert im["radius_levels"] == pytest.approx(255 * im["radius"])
    curve = record["summary"]["certified_accuracy"]
    assert curve[0]["radius"] == 0.0 and all(a["certified_accuracy"] >= b["certified_accuracy"]
                                             for a, b in zip(curve, curve[1:]))
    assert "certified accuracy" in stdout and not list(out.glob(".*"))  # no temporary file left behind
    # the same seed gives the same certificates; --limit picks by index, so the per-image stream is stable
    run(argv, capsys)
    again = json.loads((out / "results.json").read_text())
    assert [i["count"] for i in again["images"]] == [i["count"] for i in record["images"]]


@pytest.mark.parametrize("flag,value,needle", [
    ("--n", "0", "--n must be"), ("--n", "-5", "--n must be"), ("--sigma", "0", "--sigma must be"),
    ("--sigma", "-0.1", "--sigma must be"), ("--alpha", "0", "--alpha must be"), ("--alpha", "1", "--alpha must be"),
    ("--alpha", "1.5", "--alpha must be"), ("--n0", "0", "--n0 must be"), ("--batch-size", "0", "--batch-size")])
def test_cli_certify_rejects_bad_flags_with_one_line(checkpoint, tmp_path, capsys, flag, value, needle):
    argv = ["certify", "--model", str(checkpoint), "--out", str(tmp_path / "o"), flag, value]
    code, _, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medadv: error:"), err
    assert needle in err and "Fix:" in err
    assert not (tmp_path / "o").exists()


def test_certify_nan_sigma_is_rejected():
    from medadv.defenses.smoothing import check_smoothing_args

    with pytest.raises(MedadvError, match="--sigma"):
        check_smoothing_args(math.nan, 10, 0.01)


def test_cli_certify_refuses_an_out_that_is_a_file(checkpoint, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run(["certify", "--model", str(checkpoint), "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "existing file" in err and (tmp_path / "f").read_text() == "x"
