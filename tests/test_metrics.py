"""Clinical metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medadv.evaluate.metrics import clinical_metrics, youden_threshold
from medadv.evaluate.perceptibility import flips, perturbation_stats


def test_known_confusion_matrix():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.2, 0.1, 0.3, 0.7, 0.4, 0.2, 0.1])
    m = clinical_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 5, 1)
    assert m["sensitivity"] == pytest.approx(0.75) and m["specificity"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(0.8) and m["auc"] == pytest.approx(roc_auc_score(y, p))
    conf = np.where(p >= 0.5, p, 1 - p)
    assert m["mean_confidence"] == pytest.approx(conf.mean())


def test_threshold_moves_the_operating_point_not_the_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, 500), 0, 1)
    lo, hi = clinical_metrics(y, p, 0.2), clinical_metrics(y, p, 0.8)
    assert lo["sensitivity"] > hi["sensitivity"] and lo["specificity"] < hi["specificity"]
    assert lo["auc"] == hi["auc"]


def test_single_class_has_no_auc_and_nan_is_refused():
    assert clinical_metrics(np.ones(5), np.full(5, 0.9), 0.5)["auc"] is None
    from medadv.errors import MedadvError

    with pytest.raises(MedadvError):
        clinical_metrics(np.ones(2), np.array([0.5, np.nan]), 0.5)


def test_youden_maximizes_j():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + rng.uniform(0, 0.65, 400), 0, 1)
    t = youden_threshold(y, p)
    j = lambda th: clinical_metrics(y, p, th)["sensitivity"] + clinical_metrics(y, p, th)["specificity"]  # noqa
    assert all(j(t) >= j(th) - 1e-12 for th in np.linspace(0.01, 0.99, 99))


def test_perturbation_stats_are_exact_on_the_grid():
    import torch

    x = torch.randint(0, 256, (3, 1, 16, 16)).float() / 255
    adv = ((x * 255 + torch.randint(-2, 3, x.shape)).clamp(0, 255)) / 255
    s = perturbation_stats(x, adv, 255)
    assert s["linf_max"] <= 2 / 255 and s["psnr_mean"] > 30 and 0.5 < s["ssim_mean"] < 1
    assert perturbation_stats(x, x, 255)["psnr_mean"] is None
    assert flips(np.array([0, 0, 1, 1]), np.array([1, 0, 0, 1])) == {"healthy_to_disease": 1, "disease_to_healthy": 1,
                                                                    "total": 2}
