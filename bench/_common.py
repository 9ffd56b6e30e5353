"""Shared helpers for the white-box benchmarks: the victim, a batch of real images, the peers' attacks,
and interleaved timing (every method once per round, rotated, so load from other processes hits all
methods alike; ratios are taken within a round, then the median over rounds).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medadv.models import MedicalClassifier, ModelSpec, build_network, load_checkpoint


def set_threads(n: int | None) -> None:
    """Intra-op threads for this process (1 while other people use the machine's cores)."""
    if n:
        torch.set_num_threads(n)


def victim(checkpoint: str | None, size: int, seed: int = 0) -> tuple[MedicalClassifier, str]:
    """The trained checkpoint (eval mode), or a randomly initialized ResNet-18 (small stem below 64 px)."""
    if checkpoint and Path(checkpoint, "medadv.json").is_file():
        model, _ = load_checkpoint(checkpoint)
        return model.eval(), str(checkpoint)
    torch.manual_seed(seed)
    stem = "small" if size < 64 else "standard"
    spec = ModelSpec("resnet18", size, 1, 1, (0.5,), (0.25,), "chest-xray", ("healthy", "disease"), stem=stem)
    return MedicalClassifier(build_network("resnet18", 1, size, stem=stem), spec).eval(), "random weights"


def batch(model: MedicalClassifier, n: int, data_root: str | None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """n PneumoniaMNIST test images at the model's input size (as the trainer resizes them), or noise."""
    root = data_root or os.environ.get("MEDADV_DATA")
    if root and Path(root, "medmnist", "pneumoniamnist.npz").is_file():
        from medadv.data import load_split
        from medadv.errors import MedadvError

        size, what = model.spec.input_size, "pneumoniamnist test"
        try:
            test = load_split("chest-xray", "test", data_root=root, size=size, download=False)
        except MedadvError:  # no file at this size: the stored 28 px images, resized as the trainer would
            test, what = load_split("chest-xray", "test", data_root=root, download=False), f"pneumoniamnist test, 28->{size} px"
        idx = np.arange(offset, min(offset + n, len(test)))
        x = test.tensor(idx)
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)
        return x, torch.from_numpy(test.labels[idx]).long(), what
    g = torch.Generator().manual_seed(0)
    size = model.spec.input_size
    x = torch.rand((n, model.spec.data_channels, size, size), generator=g)
    return x, torch.randint(0, 2, (n,), generator=g), "uniform noise"


def frozen_copy_of_flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


def raw_passes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    """``steps`` plain forward+backward passes for the input's gradient: eval mode, parameters frozen,
    summed cross-entropy, ``torch.autograd.grad`` w.r.t. the input. The floor any PGD step pays."""

    def run() -> None:
        flags = frozen_copy_of_flags(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for _ in range(steps):
            xr = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)

    return run


def torchattacks_pgd(model: nn.Module, eps: float, alpha: float, steps: int, seed: int = 0):
    import torchattacks

    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    return lambda x, y: (torch.manual_seed(seed), atk(x, y))[1]


def torchattacks_fgsm(model: nn.Module, eps: float):
    import torchattacks

    return torchattacks.FGSM(model, eps=eps)


def art_classifier(model: nn.Module, x: torch.Tensor):
    """ART's PyTorchClassifier on [0, 1] inputs (clip_values=(0, 1)), cross-entropy loss, CPU."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=2,
                             clip_values=(0.0, 1.0), device_type="cpu")


def art_pgd(classifier, eps: float, alpha: float, steps: int, batch_size: int, seed: int = 0):
    from art.attacks.evasion import ProjectedGradientDescent

    atk = ProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps, targeted=False,
                                   num_random_init=1, batch_size=batch_size, verbose=False)

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        np.random.seed(seed)
        torch.manual_seed(seed)
        return torch.from_numpy(atk.generate(x=x.numpy(), y=y.numpy()))

    return run


def art_fgsm(classifier, eps: float, batch_size: int):
    from art.attacks.evasion import FastGradientMethod

    atk = FastGradientMethod(classifier, norm=np.inf, eps=eps, targeted=False, batch_size=batch_size)
    return lambda x, y: torch.from_numpy(atk.generate(x=x.numpy(), y=y.numpy()))


@torch.no_grad()
def argmax_success(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of images whose argmax class is not the label (the peers' criterion)."""
    model.eval()
    return float((model(x_adv).argmax(1) != y).float().mean())


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved(methods: dict[str, Callable[[], object]], rounds: int, reference: str,
                clock: str = "cpu") -> dict[str, dict[str, float]]:
    """Time every method once per round (rotating the order each round), after one warm-up call each.

    clock: ``cpu`` (this process's CPU seconds, all threads: robust to other people's load on a shared
    machine) or ``wall``. Returns per method: median seconds, and the median over rounds of its time
    over ``reference``'s time in the same round (plus the min and max of that ratio).
    """
    names, now = list(methods), CLOCKS[clock]
    for name in names:
        methods[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = now()
            methods[name]()
            times[name].append(now() - t0)
    ratios = {n: [t / ref for t, ref in zip(times[n], times[reference])] for n in names}
    return {n: {"seconds": statistics.median(times[n]), "over_ref": statistics.median(ratios[n]),
                "over_ref_min": min(ratios[n]), "over_ref_max": max(ratios[n])} for n in names}


# ------------------------------------------------------------------- the CLI studies' shared pieces

def machine() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "amx": "amx_tile" in flags, "gpu": torch.cuda.is_available(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


class CLI:
    """Runs ``medadv`` commands, records each (as typed, with its environment), its wall time and the load."""

    def __init__(self, threads: int) -> None:
        exe = Path(sys.executable).parent / "medadv"
        self.prefix = [str(exe)] if exe.is_file() else [sys.executable, "-m", "medadv"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.threads = threads
        self.log: list[dict] = []

    def __call__(self, *args: str) -> dict:
        shown = f"OMP_NUM_THREADS={self.threads} medadv " + " ".join(shlex.quote(a) for a in args)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = subprocess.run(self.prefix + list(args), env=self.env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        entry = {"command": shown, "seconds": round(seconds, 1), "load_1min_before": round(load0, 2),
                 "load_1min_after": round(os.getloadavg()[0], 2), "exit": r.returncode}
        self.log.append(entry)
        print(f"[{seconds:6.1f} s, load {load0:.2f}] {shown}", file=sys.stderr, flush=True)
        if r.returncode != 0:
            raise SystemExit(f"command failed (exit {r.returncode}): {shown}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return entry
