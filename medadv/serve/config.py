"""The service's settings, and the one function that builds them from command-line values.

``medadv serve`` and ``medadv serve batch`` both call :func:`service_config`, so the two analyse an image
under the same limits and screening settings and refuse the same bad values with the same line. No
FastAPI here: the batch mode and the token commands work without the web stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medadv.errors import MedadvError
from medadv.serve.analysis import Limits, ScreenConfig

POLICIES = ("require-provenance", "flag")
MAX_SCREEN_THRESHOLD = 1000.0  # a reader has at most 1000 findings (ModelSpec), so its L1 score at most 1000


@dataclass
class ServiceConfig:
    model: Path
    ledger: str
    policy: str = "require-provenance"
    trust_root: str | None = None
    service_key: str | None = None
    max_batch: int = 16
    max_wait_ms: float = 5.0
    limits: Limits = field(default_factory=Limits)
    screen: ScreenConfig = field(default_factory=ScreenConfig)
    rate: float = 20.0  # requests per second per token (token bucket refill)
    burst: int = 40  # bucket size

    def check(self) -> None:
        if self.policy not in POLICIES:
            raise MedadvError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}.",
                              "pass --policy require-provenance or --policy flag.")
        if not 1 <= self.max_batch <= 1024:
            raise MedadvError(f"--max-batch {self.max_batch} is not between 1 and 1024.", "pass --max-batch 16.")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise MedadvError(f"--max-wait-ms {self.max_wait_ms} is not between 0 and 10000.", "pass --max-wait-ms 5.")
        if self.rate <= 0 or self.burst < 1:
            raise MedadvError("the rate limit must be positive.", "pass --rate 20 --burst 40.")


def service_config(model: Path | str, ledger: str, *, policy: str = "require-provenance",
                   trust_root: Path | str | None = None, service_key: Path | str | None = None,
                   max_upload_mb: float = 20.0, max_pixels: int = 4096 * 4096, screen_threshold: float = 0.5,
                   max_batch: int = 16, max_wait_ms: float = 5.0, rate: float = 20.0,
                   burst: int = 40) -> ServiceConfig:
    """A checked :class:`ServiceConfig` from the commands' flags (``max_upload_mb`` in MiB). Raises
    :class:`MedadvError` naming the flag for a value out of range."""
    if not 0 < max_upload_mb <= 1024 or max_pixels < 1:
        raise MedadvError("--max-upload-mb must be in (0, 1024] and --max-pixels positive.",
                          "pass e.g. --max-upload-mb 20 --max-pixels 16777216.")
    # the score is an L1 distance between probability vectors: at most 2 for a softmax model, F for a reader
    # with F findings; the model's own bound is checked when it is loaded (medadv.serve.model.load_model)
    if not -1.0 <= screen_threshold <= MAX_SCREEN_THRESHOLD:
        raise MedadvError(f"--screen-threshold {screen_threshold} is not between -1 and 2 (a multi-label reader's: "
                          "its number of findings).", "pass e.g. --screen-threshold 0.5.")
    config = ServiceConfig(model=Path(model), ledger=ledger, policy=policy,
                           trust_root=str(trust_root) if trust_root else None,
                           service_key=str(service_key) if service_key else None, max_batch=max_batch,
                           max_wait_ms=max_wait_ms, rate=rate, burst=burst,
                           limits=Limits(max_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels),
                           screen=ScreenConfig(threshold=screen_threshold))
    config.check()
    return config
