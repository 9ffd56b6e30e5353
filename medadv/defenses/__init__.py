"""Defenses: wrappers that keep a defended model a model, randomized smoothing, adversarial training,
a feature-squeezing detector, and the checks that tell a robust model from one that only hides its gradient.

Modules: ``base`` (Preprocessor, registry, DefendedModel), one file per preprocessing defense
(``bitdepth``, ``median``, ``jpeg``, ``gaussian``, ``histeq``), ``smoothing`` and ``certify``
(randomized smoothing), ``training`` (PGD-AT, TRADES, fast AT, noise: hooks for models/train.py),
``detect`` (feature squeezing and its adaptive attack), ``masking`` (gradient-masking checks),
``checkpoint`` (save and load a model with its preprocessing defense).

Importing this package registers every preprocessing defense (one file each) in :data:`PREPROCESSORS`,
every detector in :data:`medadv.defenses.detect.DETECTORS` and every training defense in
:data:`medadv.defenses.training.TRAINING_DEFENSES`.
"""

from medadv.defenses import bitdepth, derm, fundus, gaussian, histeq, jpeg, median, noise  # noqa: F401  (register themselves)
from medadv.defenses import detect, mahalanobis, training  # noqa: F401,E402  (register detectors and training defenses)
from medadv.defenses.base import PREPROCESSORS, DefendedModel, Preprocessor, build_preprocessor, defend, register

__all__ = ["PREPROCESSORS", "DefendedModel", "Preprocessor", "build_preprocessor", "defend", "register"]
