"""Binary results before and after a change: the same commands, seed and images run on two source trees.

    .venv/bin/python bench/binary_unchanged.py --base 374d227 [--out /tmp/binary-unchanged]

A git worktree of ``--base`` is made beside the checkout; each tree runs train (ResNet-18, PneumoniaMNIST
28 px, 1 epoch on a seeded 512-image subset), evaluate, and attacks (PGD paper preset, FGSM, APGD,
AutoAttack fast, Square) with one seed, each through its own ``medadv.cli`` (PYTHONPATH first). Then
every number both trees wrote is compared: weights byte for byte, metadata and results.json value for
value, ignoring only timings, package versions and paths. Keys only one side has are listed, not hidden.
Prints one line per file and exits 1 if any shared value differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = {"seconds", "environment", "versions", "wall_seconds", "started", "finished", "model", "out", "path",
           "config_hash", "resume", "history"}

COMMANDS = [
    ["train", "--task", "chest-xray", "--arch", "resnet18", "--size", "28", "--epochs", "1", "--max-train", "512",
     "--seed", "0", "--out", "{out}/model", "--quiet"],
    ["evaluate", "--model", "{out}/model", "--out", "{out}/eval.json", "--quiet"],
    ["attack", "--model", "{out}/model", "--attack", "pgd", "--preset", "paper", "--limit", "64", "--seed", "0",
     "--out", "{out}/pgd", "--quiet", "--no-save-images"],
    ["attack", "--model", "{out}/model", "--attack", "fgsm", "--eps", "2/255", "--limit", "64", "--seed", "0",
     "--out", "{out}/fgsm", "--quiet", "--no-save-images"],
    ["attack", "--model", "{out}/model", "--attack", "apgd", "--eps", "2/255", "--target", "none", "--limit", "64",
     "--seed", "0", "--out", "{out}/apgd", "--quiet", "--no-save-images"],
    ["attack", "--model", "{out}/model", "--attack", "autoattack", "--version", "fast", "--steps", "10",
     "--max-queries", "100", "--eps", "2/255", "--target", "none", "--limit", "32", "--seed", "0",
     "--out", "{out}/autoattack", "--quiet", "--no-save-images"],
    ["attack", "--model", "{out}/model", "--attack", "square", "--max-queries", "200", "--eps", "8/255", "--limit", "32",
     "--seed", "0", "--out", "{out}/square", "--quiet", "--no-save-images"],
]


def run_tree(tree: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for cmd in COMMANDS:
        args = [a.format(out=out) for a in cmd]
        # cwd outside both trees: with ``-c`` the working directory comes first on sys.path, before PYTHONPATH
        done = subprocess.run([sys.executable, "-c", "import medadv, sys; assert medadv.__file__.startswith(sys.argv[1]); "
                               "sys.argv = sys.argv[1:]; from medadv.cli import main; main()", str(tree), *args],
                              env=env, capture_output=True, text=True, cwd=out.parent)
        if done.returncode != 0:
            raise SystemExit(f"{tree}: medadv {' '.join(args[:3])} failed:\n{done.stderr[-2000:]}")


def compare(a, b, where: str, diffs: list[str], only: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                only.append(f"{where}.{k} ({'after' if k in b else 'before'} only)")
                continue
            compare(a[k], b[k], f"{where}.{k}", diffs, only)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{where}[{i}]", diffs, only)
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        diffs.append(f"{where}: {a!r} -> {b!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="374d227", help="git revision of the 'before' tree")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="binary-unchanged-")))
    args = ap.parse_args()
    base = args.out / "base-tree"
    if not base.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.base], check=True,
                       capture_output=True)
    try:
        for name, tree in (("before", base), ("after", ROOT)):
            run_tree(tree, args.out / name)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], capture_output=True)
    before, after = args.out / "before", args.out / "after"
    failed = False
    w0, w1 = (before / "model" / "model.safetensors").read_bytes(), (after / "model" / "model.safetensors").read_bytes()
    print(f"model.safetensors: {'identical' if w0 == w1 else 'DIFFERENT'} ({len(w0)} bytes)")
    failed |= w0 != w1
    for rel in ["model/medadv.json", "eval.json", *[f"{c}/results.json" for c in ("pgd", "fgsm", "apgd", "autoattack", "square")]]:
        diffs: list[str] = []
        only: list[str] = []
        compare(json.loads((before / rel).read_text()), json.loads((after / rel).read_text()), rel, diffs, only)
        print(f"{rel}: {'equal' if not diffs else f'{len(diffs)} values differ'}"
              + (f"; keys on one side only: {', '.join(only)}" if only else ""))
        for d in diffs[:20]:
            print("   ", d)
        failed |= bool(diffs)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
