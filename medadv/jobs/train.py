"""``medadv train`` as a library call: class names, the data checks, robust training, the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError
from medadv.jobs.common import Warn, ignore
from medadv.progress import SILENT, Monitor


@dataclass
class TrainJob:
    """What to train (the fields of :class:`medadv.models.train.TrainConfig`) and where to write it.

    ``class_names``: names of the labels in order, as a sequence or comma-separated (default: the data's,
    else the task's). ``resplit_by_patient`` pools the given splits and re-splits them 70/10/20 by patient
    (recorded in the checkpoint's source). ``adv_eps`` and ``noise_sigma`` are in [0, 1] pixel units."""

    task: str
    out: Path
    arch: str = "resnet18"
    size: int = 28
    data_size: int | None = None
    epochs: int = 10
    batch_size: int = 128
    recipe: str = "auto"
    pretrained: str | None = None
    source: str | None = None
    split_seed: int = 0
    max_train: int | None = None
    augment: bool = True
    adversarial: str | None = None
    adv_eps: float = 4 / 255
    adv_steps: int = 7
    trades_beta: float = 6.0
    noise_sigma: float = 0.0
    sync_batchnorm: bool = False
    resplit_by_patient: bool = False
    class_names: str | tuple[str, ...] | None = None
    findings: str | tuple[str, ...] | None = None  # multi-label: comma-separated, or "all" columns of labels.csv
    uncertain: str | None = None  # multi-label: what -1 means (ignore, zeros, ones); None: the task's
    class_weights: bool = False
    threshold_rule: str = "youden"
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainResult:
    """The written checkpoint: its folder, its metadata and the validation record it was selected on.

    ``is_main`` is False on the other ranks of a torchrun job, which write nothing."""

    out: Path
    meta: dict[str, Any]
    is_main: bool = True

    @property
    def validation(self) -> dict[str, Any]:
        return self.meta["validation"]

    @property
    def selection(self) -> str:
        """What the model was selected on (validation AUC, robust validation accuracy...)."""
        return self.meta["training"].get("selection", "validation AUC")

    @property
    def threshold_rule(self) -> str:
        """How the operating point was chosen, in words."""
        rule = self.meta["training"].get("threshold_rule", "youden")
        if rule == "argmax":
            return "decision: the most probable class"
        if rule.startswith("per pixel"):  # a segmentation model's fixed rule
            return f"decision {rule}"
        per = " per finding" if rule.endswith(" per finding") else ""
        rule = rule.removesuffix(" per finding")
        how = "by Youden's J" if rule == "youden" else f"at sensitivity >= {rule.partition(':')[2]} on validation"
        return f"a threshold{per} {how}" if per else f"threshold {how}"


def _class_names(job: TrainJob, source: str | None) -> tuple[str, ...] | None:
    from medadv.data import data_class_names, get_task

    classes = get_task(job.task).classes
    given = job.class_names
    if isinstance(given, str):
        names = tuple(n.strip() for n in given.split(","))
    elif given:
        names = tuple(given)
    else:
        names = data_class_names(job.task, source, data_root=job.data_root)
    if names is not None and (len(names) != classes or not all(names)):
        raise MedadvError(f"--class-names {given!r} does not name {classes} classes.",
                          "pass one name per class, comma-separated, e.g. --class-names normal,abnormal.")
    return names


def train(job: TrainJob, *, monitor: Monitor = SILENT, warn: Warn = ignore) -> TrainResult:
    """Train ``job`` and write the checkpoint (rank 0 of a torchrun job writes; every rank trains).

    A killed run resumes from its last finished epoch when started again with the same job."""
    from medadv.data import (RESPLIT, get_task, parse_findings, resolve_data_root, resolve_source, split_leakage,
                             with_findings)
    from medadv.data.leakage import warning as leakage_warning
    from medadv.defenses.training import robust_training
    from medadv.dist import current
    from medadv.models.train import TrainConfig, train as run_training

    # resolved here, at the network's size (a 224 px network reads a full-resolution folder when present), so
    # the class names, the leakage check and the training read one source, which the checkpoint records
    source = resolve_source(get_task(job.task), job.source, resolve_data_root(job.data_root), job.size)
    if job.resplit_by_patient and not source.startswith(RESPLIT):  # the checkpoint's source says resplit
        source = RESPLIT + source
    findings = job.findings
    if isinstance(findings, str):
        findings = parse_findings(findings, job.task, source, data_root=job.data_root)
    if findings is not None or job.uncertain is not None:
        if job.class_names:
            raise MedadvError("--class-names names a classifier's classes; a reader's are its --findings.",
                              "pass the finding columns with --findings.")
        with_findings(get_task(job.task), tuple(findings) if findings else None, job.uncertain)  # checked at the door
    names = None if findings is not None else _class_names(job, source)
    cfg = TrainConfig(task=job.task, arch=job.arch, size=job.size, epochs=job.epochs, batch_size=job.batch_size,
                      seed=job.seed, recipe=job.recipe, pretrained=job.pretrained, source=source,
                      split_seed=job.split_seed, augment=job.augment, max_train=job.max_train,
                      data_size=job.data_size, adversarial=job.adversarial, adv_eps=job.adv_eps,
                      adv_steps=job.adv_steps, trades_beta=job.trades_beta, noise_sigma=job.noise_sigma,
                      sync_batchnorm=job.sync_batchnorm, findings=tuple(findings) if findings else None,
                      uncertain=job.uncertain, class_weights=job.class_weights, threshold_rule=job.threshold_rule)
    leak = leakage_warning(split_leakage(with_findings(get_task(job.task), cfg.findings, cfg.uncertain), source,
                                         data_root=job.data_root, split_seed=job.split_seed))
    if leak and current().is_main:  # said before the training time is spent: the validation figures would be optimistic
        warn(leak)
    # the job hands the adversarial loss to the trainer (models sits below defenses)
    _, meta = run_training(cfg, job.out, data_root=job.data_root, monitor=monitor, device=job.device,
                           robust=robust_training(cfg))
    if not current().is_main:
        return TrainResult(job.out, meta, is_main=False)
    if names is not None:
        from medadv.models.checkpoint import set_class_names

        set_class_names(job.out, names)
    return TrainResult(job.out, meta)
