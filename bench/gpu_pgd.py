"""PGD-20 throughput on a GPU (issue 13, item 3): a ResNet-50 at 224 px, medadv's paths against the floor.

PGD-20, L-inf eps 4/255, step eps/4, random start, untargeted cross-entropy, continuous outputs (no
storage grid), over ``--images`` images in batches of ``--batch-size``, on ``--device cuda`` (default)
or ``cpu``. Every column runs on the same model and the same images, timed interleaved in one process
(each round runs every column once, the order rotated each round), after warm-up; the GPU is
synchronized before and after each timing; a column's time is the median over ``--repeats`` rounds and
its ratio to the floor is taken within a round, then the median over rounds:

    floor_fp32            20 plain forward+backward passes per batch for the input's gradient (eval
                          mode, parameters frozen, summed cross-entropy, torch.autograd.grad w.r.t. the
                          input) of the model as built: the floor any PGD step pays
    floor_bf16            the same on the bf16 fast-path copy (the floor of the bf16 columns)
    medadv_fp32           PGD(threat)(model, x, y): the eager loop on the model as given
    medadv_fast_fp32      PGD(threat, fast="fp32"): BatchNorm folded, the fast path's own layout choice
                          (NCHW for a ResNet: what measured fastest on the CPU it was tuned on)
    medadv_fast_fp32_cl   PGD on accelerate(model, "fp32", channels_last=True): BN folded, NHWC
    medadv_fast_bf16      PGD(threat, fast="bf16"): BN folded, bf16 weights and activations, NHWC
    medadv_autocast_bf16  PGD(threat)(model, x, y) inside torch.autocast(dtype=bfloat16): the eager model
    torchattacks          torchattacks.PGD(model, eps, alpha, 20, random_start=True) (when importable)
    medadv_compile_fp32_cl, medadv_compile_bf16
                          (--compile) the fp32-NHWC and bf16 fast copies through torch.compile; the
                          compile time is their warm-up, reported apart

Reported per column: seconds (median), images/s, time over floor_fp32 (PGD-time / (20 x fwd+bwd
time), range over rounds), time over its own floor (bf16 columns: floor_bf16), speed-up over
medadv_fp32, achieved TFLOP/s (convolution and matrix FLOPs of one pass, counted by
torch.utils.flop_counter at batch 1, times 20 x images, over seconds), peak GPU memory
(torch.cuda.max_memory_allocated during the column's run; the images and one output buffer, resident
throughout, are reported apart), and the self-check: every adversarial image within eps of its
original and in [0, 1]. Also: GPU name, torch, CUDA and cuDNN versions, TF32 flags, cudnn.benchmark.
Fractions misclassified after the attack are reported too; with random weights they mean nothing.

Victim: MONAI ResNet-50 (the medadv zoo) in MedicalClassifier, 3-channel input, ImageNet mean/std
inside the wrapper, **randomly initialized with a fixed seed** (``--seed``): throughput does not depend
on the weights; ``--model`` takes a trained checkpoint instead. The zoo keeps MONAI's stem, a 7x7
convolution at stride 1, so at 224 px one forward pass costs 32.7 GFLOP (torch's counter), four times
torchvision's ResNet-50 (8.2), and a forward+backward pass for the input's gradient 65.4 GFLOP.
Images: the ISIC 2017 dermoscopy test split (256 px JPEGs, decoded and resized to ``--size`` as
medadv.data reads a folder, so the wrapper does no resize in the loop) from ``--data-root``,
``$MEDADV_DATA``, ``shared/data`` or ``../shared/data``, repeated to fill ``--images`` when the split
holds fewer (510 test images; ``--splits test val train`` for distinct ones, slower to load); else
uniform noise on the 8-bit grid.

One command for a one-shot 10-minute GPU window (every number; the JSON is rewritten after every round,
so a run cut short still leaves what it measured; a round is started only when it is projected to end
within ``--budget-s``, 480 s by default, counted from the script's start):

    .venv/bin/pip install --no-deps --target /tmp/peers torchattacks==3.5.1     # once, where pip works
    MEDADV_DATA=../shared/data PYTHONPATH=/tmp/peers .venv/bin/python bench/gpu_pgd.py \\
        --compile --json runs/gpu_pgd.json

``--quick`` (about 3 minutes on an H100/H200: 256 images, 2 rounds, budget 150 s; ``--compile`` would
add a minute or two per compiled column, and is skipped once 60% of the budget is gone):

    MEDADV_DATA=../shared/data PYTHONPATH=/tmp/peers .venv/bin/python bench/gpu_pgd.py --quick \\
        --json runs/gpu_pgd_quick.json

CPU smoke test (tiny; its numbers say nothing about a GPU):

    .venv/bin/python bench/gpu_pgd.py --device cpu --images 8 --batch-size 4 --size 64 --repeats 1

Without torchattacks the column is skipped and the reason recorded. Needs torch, monai, numpy, Pillow
and this repository (``pip install -e .`` or ``PYTHONPATH=.``); nothing else of medadv's dependencies is
imported. On a GPU machine that has torch but no registry access, bring the two pure-Python wheels
(``pip download --no-deps -d wheels monai==1.6.1 torchattacks==3.5.1`` where pip works; there
``pip install --no-deps --target /tmp/site wheels/*.whl`` and ``PYTHONPATH=/tmp/site:.``) and the
isic2017 folder (22 MB) under ``--data-root``. The exit status is 1 when the self-check fails, 2 when
the device or the floor is unusable, 0 otherwise (a column that fails, e.g. out of memory or a failed
compile, is recorded under "skipped" with its error and the others go on). Compiled columns are not
warmed up (compiled) once 60% of ``--budget-s`` is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from medadv.attacks import PGD, ThreatModel  # noqa: E402
from medadv.attacks.fast import accelerate, accelerated  # noqa: E402
from medadv.models import MedicalClassifier, ModelSpec, build_network, load_checkpoint  # noqa: E402
from medadv.models.zoo import IMAGENET_MEAN, IMAGENET_STD, get_arch, stem_for  # noqa: E402

FLOORS = ("floor_fp32", "floor_bf16")
PGD_METHODS = ("medadv_fp32", "medadv_fast_fp32", "medadv_fast_fp32_cl", "medadv_fast_bf16", "medadv_autocast_bf16",
               "torchattacks")
COMPILED = ("medadv_compile_fp32_cl", "medadv_compile_bf16")
OWN_FLOOR = {"medadv_fast_bf16": "floor_bf16", "medadv_compile_bf16": "floor_bf16"}  # others: floor_fp32
QUICK = {"images": 256, "repeats": 2, "budget_s": 150.0}
FULL = {"images": 1024, "repeats": 3, "budget_s": 480.0}


def log(msg: str) -> None:
    print(f"[gpu_pgd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- victim and images

def build_victim(args: argparse.Namespace, device: torch.device) -> tuple[MedicalClassifier, str]:
    """A trained checkpoint (``--model``), else a MONAI ResNet-50 with seeded random weights."""
    if args.model:
        model, _ = load_checkpoint(args.model)
        return model.to(device).eval(), f"checkpoint {args.model} ({model.spec.arch}, {model.spec.input_size} px)"
    torch.manual_seed(args.seed)
    stem = stem_for(get_arch("resnet50"), args.size)
    spec = ModelSpec("resnet50", args.size, 3, 3, IMAGENET_MEAN, IMAGENET_STD, "derm-melanoma", ("nevus", "melanoma"),
                     stem=stem)
    model = MedicalClassifier(build_network("resnet50", 3, args.size, stem=stem), spec).to(device).eval()
    return model, f"MONAI resnet50, {stem} stem, random init (torch.manual_seed({args.seed})): timing only"


def data_root(given: str | None) -> Path | None:
    for cand in (given, os.environ.get("MEDADV_DATA"), REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if cand and Path(cand, "isic2017", "labels.csv").is_file():
            return Path(cand)
    return None


def images(model: MedicalClassifier, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``--images`` images at the model's input size in [0, 1] and their labels (CPU tensors)."""
    n, size, channels = args.images, model.spec.input_size, model.spec.data_channels
    root = data_root(args.data_root)
    why = "no isic2017/labels.csv under --data-root, $MEDADV_DATA, shared/data or ../shared/data"
    if root is not None and channels == 3:
        try:  # the rows medadv.data.load_split would pick, decoded and resized as it does; only those needed
            from medadv.data.folder import load_images_full, read_labels

            folder = root / "isic2017"
            rows = read_labels(folder)
            picked = [r for s in args.splits for r in rows if r.split == s][:n]
            loaded = load_images_full([r.path for r in picked], size, str(folder))
            x = torch.from_numpy(loaded.pixels.astype("float32") / loaded.levels)
            y = torch.tensor([r.label for r in picked], dtype=torch.long)
            what = f"ISIC 2017 {'+'.join(args.splits)} ({len(picked)} distinct, {x.shape[-1]} px)"
            if len(picked) < n:
                reps = -(-n // len(picked))
                x, y = x.repeat(reps, 1, 1, 1)[:n], y.repeat(reps)[:n]
                what += f", repeated to {n}"
            return x, y, what
        except Exception as exc:  # noqa: BLE001 - fall back to noise, saying why
            why = f"reading {root / 'isic2017'} failed: {type(exc).__name__}: {str(exc)[:120]}"
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g).float() / 255
    return x, torch.randint(0, 2, (n,), generator=g), f"uniform noise on the 8-bit grid ({why})"


def flops_per_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """FLOPs of one forward+backward (input gradient) pass for one image, as torch's counter sees them."""
    flags = [p.requires_grad for p in model.parameters()]
    try:
        from torch.utils.flop_counter import FlopCounterMode

        for p in model.parameters():  # frozen, as in the floor: only the input's gradient is formed
            p.requires_grad_(False)
        xr = x[:1].clone().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:  # .backward(): the counter's hooks refuse autograd.grad
            F.cross_entropy(model(xr), y[:1], reduction="sum").backward()
        return float(counter.get_total_flops())
    except Exception as exc:  # noqa: BLE001 - optional figure
        log(f"no FLOP count: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


# --------------------------------------------------------------------------- the columns

def floor(model: nn.Module, steps: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """``steps`` forward+backward passes for the input's gradient, parameters frozen (as bench/_common)."""

    def run(x: torch.Tensor, y: torch.Tensor) -> None:
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for _ in range(steps):
            xr = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)

    return run


def columns(model: MedicalClassifier, threat: ThreatModel, args: argparse.Namespace, device: torch.device,
            skipped: dict[str, str]) -> tuple[dict[str, Callable], dict[str, dict]]:
    """name -> fn(x_batch, y_batch) (the adversarial batch, or None for a floor), and what each copy is."""
    copies: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    t0 = time.perf_counter()
    copies["fp32"] = accelerated(model, "fp32")  # PGD(fast=...) finds these cached
    copies["bf16"] = accelerated(model, "bf16")
    copies["fp32_cl"] = accelerate(model, "fp32", channels_last=True)
    info["accelerate_seconds_each"] = round((time.perf_counter() - t0) / 3, 3)
    for k, m in copies.items():
        info[k] = dict(m.info)

    def pgd(victim: nn.Module, fast: str | None = None) -> Callable:
        return lambda x, y: PGD(threat, seed=args.seed, fast=fast)(victim, x, y).x_adv

    def autocast_pgd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return PGD(threat, seed=args.seed)(model, x, y).x_adv

    fns: dict[str, Callable] = {
        "floor_fp32": floor(model, threat.steps),
        "floor_bf16": floor(copies["bf16"], threat.steps),
        "medadv_fp32": pgd(model),
        "medadv_fast_fp32": pgd(model, "fp32"),
        "medadv_fast_fp32_cl": pgd(copies["fp32_cl"]),
        "medadv_fast_bf16": pgd(model, "bf16"),
        "medadv_autocast_bf16": autocast_pgd,
    }
    try:
        import torchattacks
    except ImportError as exc:
        skipped["torchattacks"] = (f"not importable ({exc}); install: pip install --no-deps --target /tmp/peers "
                                   "torchattacks==3.5.1 and set PYTHONPATH=/tmp/peers")
    else:
        atk = torchattacks.PGD(model, eps=threat.eps, alpha=threat.alpha, steps=threat.steps, random_start=True)
        info["torchattacks_version"] = torchattacks.__version__

        def ta(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            torch.manual_seed(args.seed)
            return atk(x, y)

        fns["torchattacks"] = ta
    if args.compile:
        for name, precision, cl in (("medadv_compile_fp32_cl", "fp32", True), ("medadv_compile_bf16", "bf16", None)):
            try:
                compiled = accelerate(model, precision, channels_last=cl, compile=True)
            except Exception as exc:  # noqa: BLE001
                skipped[name] = f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}"
                continue
            fns[name] = pgd(compiled)
            info[name] = dict(compiled.info)
    wanted = set(args.methods) if args.methods else set(fns)
    wanted |= {"floor_fp32"}  # every ratio needs it
    for name in list(fns):
        if name not in wanted:
            del fns[name]
            skipped.setdefault(name, "not in --methods")
    for name in wanted - set(fns):
        skipped.setdefault(name, "needs --compile" if name in COMPILED else "not available")
    return fns, info


def sweep(fn: Callable, x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None, batch: int) -> None:
    for i in range(0, len(x), batch):
        adv = fn(x[i:i + batch], y[i:i + batch])
        if adv is not None and out is not None:
            out[i:i + batch].copy_(adv)


@torch.no_grad()
def check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, eps: float, batch: int) -> dict:
    """Largest |x_adv - x|, range of x_adv, whether inside the ball and [0, 1], argmax error after."""
    linf = float((adv - x).abs().amax())
    lo, hi = float(adv.amin()), float(adv.amax())
    wrong = sum(int((model(adv[i:i + batch]).argmax(1) != y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return {"linf": linf, "min": lo, "max": hi, "ok": linf <= eps + 1e-6 and lo >= 0.0 and hi <= 1.0,
            "error_after": round(wrong / len(x), 4)}


# --------------------------------------------------------------------------- environment and report

def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device), "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_average": round(os.getloadavg()[0], 2), "platform": platform.platform()}
    try:
        import monai

        env["monai"] = monai.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), gpu_multiprocessors=p.multi_processor_count,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_cudnn=torch.backends.cudnn.allow_tf32, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def summarize(times: dict[str, list[float]], peaks: dict[str, float], n: int, steps: int,
              flops: float | None) -> dict[str, dict]:
    """Per column: median seconds, images/s, ratios within a round (median, min, max), TFLOP/s, peak."""
    out: dict[str, dict] = {}
    rounds = min(len(v) for v in times.values()) if times else 0
    ref = times.get("floor_fp32", [])[:rounds]
    base = times.get("medadv_fp32", [])[:rounds]
    for name, ts in times.items():
        ts = ts[:rounds]
        if not ts:
            continue
        sec = statistics.median(ts)
        row = {"seconds": round(sec, 4), "seconds_all": [round(t, 4) for t in ts], "images_per_s": round(n / sec, 2)}
        if name.startswith("floor"):
            row["passes_per_s"] = round(n * steps / sec, 1)  # images through one forward+backward per second
        if ref:
            r = [t / f for t, f in zip(ts, ref)]
            row.update(over_floor_fp32=round(statistics.median(r), 4), over_floor_fp32_range=[round(min(r), 4),
                                                                                              round(max(r), 4)])
        own = times.get(OWN_FLOOR.get(name, "floor_fp32"), [])[:rounds]
        if own and not name.startswith("floor"):
            row["over_own_floor"] = round(statistics.median(t / f for t, f in zip(ts, own)), 4)
            row["own_floor"] = OWN_FLOOR.get(name, "floor_fp32")
        if base and not name.startswith("floor"):
            row["speedup_vs_medadv_fp32"] = round(statistics.median(b / t for t, b in zip(ts, base)), 3)
        if flops:
            row["achieved_tflops"] = round(flops * steps * n / sec / 1e12, 2)
        if name in peaks:
            row["peak_mib"] = round(peaks[name], 1)
        out[name] = row
    return out


def write(path: str | None, report: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(p)


def table(report: dict) -> str:
    s = report["setup"]
    env = report["env"]
    where = env.get("gpu") or f"CPU ({env['cpu_threads']} threads, load {env['load_average']})"
    lines = [f"{where}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
             f"{s['model']}; {s['images']}; N {s['n']}, batch {s['batch_size']}, {s['size']} px; PGD-{s['steps']} "
             f"L-inf eps {s['eps']:.5f} step {s['alpha']:.5f}; rounds {s['rounds_done']}/{s['repeats']}; "
             f"resident {s.get('resident_mib', 'n/a')} MiB",
             f"{'column':24} {'img/s':>9} {'s (median)':>11} {'/floor32':>9} {'range':>13} {'/own':>7} {'x fp32':>7} "
             f"{'TFLOP/s':>8} {'peak MiB':>9}"]
    nan = float("nan")
    for name, r in report["results"].items():
        rng = r.get("over_floor_fp32_range")
        lines.append(f"{name:24} {r['images_per_s']:9.2f} {r['seconds']:11.3f} {r.get('over_floor_fp32', nan):9.3f} "
                     f"{(f'{rng[0]:.3f}-{rng[1]:.3f}' if rng else ''):>13} {r.get('over_own_floor', nan):7.3f} "
                     f"{r.get('speedup_vs_medadv_fp32', nan):7.2f} {r.get('achieved_tflops', nan):8.2f} "
                     f"{r.get('peak_mib', nan):9.1f}")
    for name, why in report["skipped"].items():
        if why != "not in --methods":
            lines.append(f"{name:24} skipped: {why}")
    floors = [f"{k} {report['results'][k]['passes_per_s']:.1f}" for k in FLOORS if k in report["results"]]
    if floors:
        lines.append("images through one forward+backward per second (the floor's throughput): " + ", ".join(floors))
    for name, w in report.get("warmup_seconds", {}).items():
        if name.startswith("medadv_compile"):
            lines.append(f"{name:24} compile + first batch: {w:.1f} s")
    c = report.get("self_check")
    if c:
        lines.append(c["line"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # no prefixes: may be started under torchrun later
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--images", type=int, default=None, help="images attacked per column (default 1024; --quick 256)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=224, help="network input and image size, px")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds, medians (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each column on one batch first")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eps", type=float, default=4 / 255, help="L-inf budget in [0, 1] units (default 4/255)")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd fp32-NHWC and bf16 fast copies")
    ap.add_argument("--quick", action="store_true",
                    help="256 images, 2 rounds, 150 s budget (about 3 min on an H100/H200 without --compile)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new round past this many seconds from the start (default 480; --quick 150)")
    ap.add_argument("--methods", nargs="+", default=None, choices=FLOORS + PGD_METHODS + COMPILED,
                    help="columns to run (default: all available; floor_fp32 always runs)")
    ap.add_argument("--model", default=None, help="a trained medadv checkpoint instead of the random ResNet-50")
    ap.add_argument("--data-root", default=None, help="folder holding isic2017/ (default $MEDADV_DATA, shared/data)")
    ap.add_argument("--splits", nargs="+", default=["test"], choices=["test", "val", "train"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 with --device cpu, as on the shared 2-core VM "
                         "oversubscribed threads spin; torch's own choice with cuda)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (default on)")
    ap.add_argument("--no-tf32", action="store_true",
                    help="fp32 convolutions in full fp32 (default: PyTorch's, TF32 tensor cores for cuDNN)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the report here (rewritten after each round)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("images", "repeats", "budget_s"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.images < 1 or args.batch_size < 1 or args.repeats < 1 or args.steps < 1:
        ap.error("--images, --batch-size, --repeats and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_pgd: --device {args.device} but torch {torch.__version__} sees no CUDA device; "
              "pass --device cpu for the smoke test.", file=sys.stderr)
        return 2
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        if args.no_tf32:  # PyTorch's default: TF32 on for cuDNN convolutions, off for matmuls
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    log(f"building the victim on {device}")
    model, source = build_victim(args, device)
    args.size = model.spec.input_size
    t0 = time.perf_counter()
    x_cpu, y_cpu, what = images(model, args)
    load_s = time.perf_counter() - t0
    x, y = x_cpu.to(device), y_cpu.to(device)
    threat = ThreatModel(norm="linf", eps=args.eps, step_size=args.eps / 4, steps=args.steps, random_start=True,
                         target="none", levels=None)
    n, bs = len(x), args.batch_size
    skipped: dict[str, str] = {}
    log(f"{what}: loaded in {load_s:.1f} s; building the accelerated copies")
    fns, copies = columns(model, threat, args, device, skipped)
    flops = flops_per_pass(model, x, y)
    adv = torch.empty_like(x)  # one output buffer, reused by every column
    report: dict = {
        "benchmark": "bench/gpu_pgd.py", "argv": sys.argv[1:], "complete": False, "env": environment(device),
        "setup": {"model": source, "images": what, "n": n, "batch_size": bs, "size": args.size,
                  "eps": threat.eps, "alpha": threat.alpha, "steps": threat.steps, "random_start": True,
                  "target": "none (untargeted cross-entropy)", "grid": "continuous", "repeats": args.repeats,
                  "rounds_done": 0, "warmup": args.warmup, "budget_s": args.budget_s, "quick": args.quick,
                  "image_load_seconds": round(load_s, 2), "flops_per_image_pass": flops, "column_info": copies},
        "results": {}, "skipped": skipped, "warmup_seconds": {},
    }
    if device.type == "cuda":
        sync(device)
        report["setup"]["resident_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    write(args.json, report)

    # warm-up: each column on the first batch (and on a smaller last batch: another shape to compile/tune)
    shapes = [slice(0, min(bs, n))] + ([slice(n - n % bs, n)] if n % bs and n > bs else [])
    for name in list(fns):
        if name in COMPILED and time.perf_counter() - start > 0.6 * args.budget_s:
            skipped[name] = f"not compiled: {time.perf_counter() - start:.0f} s of --budget-s {args.budget_s:.0f} gone"
            del fns[name]
            continue
        log(f"warm-up {name}")
        t0 = time.perf_counter()
        try:
            for _ in range(args.warmup):
                for s in shapes:
                    fns[name](x[s], y[s])
            sync(device)
        except Exception as exc:  # noqa: BLE001 - one failing column must not lose the others
            skipped[name] = f"failed in warm-up: {type(exc).__name__}: {str(exc)[:300]}"
            del fns[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        report["warmup_seconds"][name] = round(time.perf_counter() - t0, 2)
    if "floor_fp32" not in fns:
        write(args.json, report)
        print(f"gpu_pgd: the floor failed: {skipped.get('floor_fp32')}", file=sys.stderr)
        return 2

    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float] = {}
    checks: dict[str, dict] = {}
    clean_error = check(model, x, y, x, threat.eps, bs)["error_after"]
    report["setup"]["clean_error"] = clean_error
    round_s: list[float] = []
    names = list(fns)
    for r in range(args.repeats):
        elapsed = time.perf_counter() - start
        if r and elapsed + 1.1 * max(round_s) > args.budget_s:
            log(f"budget: {elapsed:.0f} s gone, a round takes {max(round_s):.0f} s, --budget-s {args.budget_s:.0f}: "
                f"stopping after {r} round(s)")
            report["setup"]["stopped_by_budget"] = True
            break
        t_round = time.perf_counter()
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in fns:
                continue
            is_floor = name.startswith("floor")
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            try:
                sweep(fns[name], x, y, None if is_floor else adv, bs)
                sync(device)
            except Exception as exc:  # noqa: BLE001
                skipped[name] = f"failed in round {r}: {type(exc).__name__}: {str(exc)[:300]}"
                del fns[name]
                times.pop(name, None)
                continue
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
            if not is_floor and name not in checks:
                checks[name] = check(model, x, y, adv, threat.eps, bs)
            log(f"round {r} {name}: {times[name][-1]:.3f} s")
        round_s.append(time.perf_counter() - t_round)
        report["setup"]["rounds_done"] = r + 1
        report["results"] = summarize(times, peaks, n, threat.steps, flops)
        for name, c in checks.items():
            if name in report["results"]:
                report["results"][name].update(check=c)
        write(args.json, report)

    ok = all(c["ok"] for c in checks.values())
    worst = max((c["linf"] for c in checks.values()), default=float("nan"))
    lo = min((c["min"] for c in checks.values()), default=float("nan"))
    hi = max((c["max"] for c in checks.values()), default=float("nan"))
    line = (f"self-check {'OK' if ok else 'FAILED'}: {len(checks)} PGD columns x {n} images, max |x_adv - x| "
            f"{worst:.6f} <= eps {threat.eps:.6f}: {worst <= threat.eps + 1e-6}, x_adv in [{lo:.4f}, {hi:.4f}] "
            f"within [0, 1]: {lo >= 0 and hi <= 1}")
    report["self_check"] = {"ok": ok, "line": line, "max_linf": worst, "min": lo, "max": hi}
    report["complete"] = True
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    write(args.json, report)
    print(table(report))
    print(f"clean error {clean_error:.3f} (random weights: meaningless); total {report['total_seconds']} s"
          + (f"; JSON: {args.json}" if args.json else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
