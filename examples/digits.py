"""The digits case of docs/evaluation.md: clip-tiny trained on scikit-learn's handwritten digits
from a CSV, then zero-shot on held-out digits from the command line.

    python examples/digits.py --out runs/digits              # data, training, both evaluations
    python examples/digits.py --out runs/digits --data-only  # only write the data

It writes OUT/train.csv (image,caption,label: "a handwritten digit 3", 3; training reads the
first two, the linear probe the label) with the PNGs beside it, a
held-out image folder OUT/test/DIGIT/*.png (20 % of each class, seed 0), OUT/classnames.txt and
OUT/templates.txt, then runs these commands and prints their metrics:

    polysense train clip-tiny --data OUT/train.csv --out OUT/ckpt --set train.steps=STEPS
    polysense eval zeroshot --ckpt OUT/ckpt --data OUT/test --json OUT/default.json
    polysense eval zeroshot --ckpt OUT/ckpt --data OUT/test --templates world --json OUT/world.json
    polysense eval zeroshot --ckpt OUT/ckpt --data OUT/test --classnames OUT/classnames.txt \
        --templates OUT/templates.txt --json OUT/digits.json
    polysense eval linear-probe --ckpt OUT/ckpt --data OUT/test --train-data OUT/train.csv \
        --json OUT/probe.json

The first evaluation uses what the CLI picks without help (class names from the folder names,
the `openai` templates); the second the world's templates, which the CLI used on every dataset
before; the third gives the class names and the prompt the captions use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32  # clip-tiny's input size; each 8x8 digit is scaled up 4x (nearest neighbour)
TEMPLATE = "a handwritten digit {}"


def write_data(out: Path, *, test_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Write the train CSV, the held-out image folder, classnames.txt and templates.txt;
    returns (train images, test images)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(digits.target), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(digits.target == digit)
        test[rng.choice(members, size=round(test_fraction * len(members)), replace=False)] = True
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption,label"]
    for i, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        grey = (255 - pixels * (255 / 16)).astype(np.uint8)  # dark ink on white paper
        image = Image.fromarray(grey).resize((SIDE, SIDE), Image.NEAREST).convert("RGB")
        if test[i]:
            folder = out / "test" / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}.png")
        else:
            image.save(out / "images" / f"{i:04d}.png")
            rows.append(f"images/{i:04d}.png,{TEMPLATE.format(digit)},{digit}")
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    (out / "classnames.txt").write_text("\n".join(str(d) for d in range(10)) + "\n")
    (out / "templates.txt").write_text(TEMPLATE + "\n")
    return len(rows) - 1, int(test.sum())


def polysense(*args: str) -> None:
    command = [sys.executable, "-m", "polysense.cli", *args]
    print("$ polysense " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/digits"))
    parser.add_argument("--steps", type=int, default=800, help="training steps (clip-tiny's own)")
    parser.add_argument("--data-only", action="store_true", help="write the data and stop")
    args = parser.parse_args()
    out: Path = args.out
    n_train, n_test = write_data(out)
    print(f"wrote {n_train} training images ({out / 'train.csv'}) and {n_test} held out")
    if args.data_only:
        return
    ckpt = out / "ckpt"
    polysense("train", "clip-tiny", "--data", str(out / "train.csv"), "--out", str(ckpt),
              "--set", f"train.steps={args.steps}")  # fmt: skip
    test = str(out / "test")
    polysense("eval", "zeroshot", "--ckpt", str(ckpt), "--data", test,
              "--json", str(out / "default.json"))  # fmt: skip
    polysense("eval", "zeroshot", "--ckpt", str(ckpt), "--data", test, "--templates", "world",
              "--json", str(out / "world.json"))  # fmt: skip
    polysense("eval", "zeroshot", "--ckpt", str(ckpt), "--data", test,
              "--classnames", str(out / "classnames.txt"),
              "--templates", str(out / "templates.txt"), "--json", str(out / "digits.json"))  # fmt: skip
    polysense("eval", "linear-probe", "--ckpt", str(ckpt), "--data", test,
              "--train-data", str(out / "train.csv"), "--json", str(out / "probe.json"))  # fmt: skip
    for name in ("default", "world", "digits"):
        metrics = json.loads((out / f"{name}.json").read_text())
        print(f"zero-shot, {name} prompts: top-1 {metrics['zeroshot_top1']:.3f} "
              f"on {metrics['zeroshot_n_samples']} of {metrics['n_samples']} samples")  # fmt: skip
    probe = json.loads((out / "probe.json").read_text())
    print(f"linear probe: top-1 {probe['linear_probe_top1']:.3f} (C={probe['linear_probe_c']:g}, "
          f"{probe['linear_probe_n_train']} train images)")  # fmt: skip


if __name__ == "__main__":
    main()
