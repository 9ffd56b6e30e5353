"""Clinical metrics, where the evaluation layer has always found them. They live in :mod:`medadv.metrics`,
below models and evaluate alike, so training can score its validation split without importing the
evaluation layer."""

from medadv.metrics import clinical_metrics, youden_threshold

__all__ = ["clinical_metrics", "youden_threshold"]
