"""Measuring models: clinical metrics, imperceptibility, and the attack battery."""

from medadv.evaluate.metrics import clinical_metrics, youden_threshold

__all__ = ["clinical_metrics", "youden_threshold"]
