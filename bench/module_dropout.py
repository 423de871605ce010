"""Choose the brain's module dropout by measurement, on a trained run's arms.

python bench/module_dropout.py runs/NAME --p 0 0.25 0.5 0.75 --seeds 3

The run's arms compute their outputs for the training and validation splits once;
then a fresh brain is trained on the training outputs for each dropout share `p`
and seed, as the brain actor does (the run's epochs x brain passes, batch size and
learning rate), and scored on the validation split with all arms, with each single
arm and with each pair masked. Writes module_dropout.json and .png in RUN_DIR.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arms.augment import resize, to_tensor  # noqa: E402
from brain.model import arm_dropout_mask, build_brain  # noqa: E402
from common.datasets import load_dataset, split_indices  # noqa: E402
from deploy.api import load_run  # noqa: E402
from deploy.training import git_revision  # noqa: E402


@torch.no_grad()
def arm_outputs(model, images: np.ndarray, batch_size: int = 500):
    """Features (N, A, D) and logits (N, A, C) of every arm for uint8 images."""
    head_logits = model.config.brain_mode != "attention"
    features, logits = [], []
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start : start + batch_size])
        per_arm = [
            arm.infer(resize(x, arm.resolution), head_logits=head_logits)
            for arm in model.arms
        ]
        features.append(torch.stack([f for f, _ in per_arm], 1))
        logits.append(torch.stack([lg for _, lg in per_arm], 1))
    return torch.cat(features), torch.cat(logits)


def train_brain(config, num_classes, train, p: float, seed: int):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    brain = build_brain(config, num_classes)
    optimizer = torch.optim.AdamW(brain.parameters(), lr=config.brain_lr)
    features, logits, labels = train
    brain.train()
    for _ in range(config.epochs * config.brain_passes):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            live = arm_dropout_mask(len(index), config.arms, p, generator)
            output, _ = brain(features[index], logits[index], live)
            loss = F.cross_entropy(output, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return brain.eval()


@torch.no_grad()
def score(brain, val, arms: int) -> dict[str, float]:
    features, logits, labels = val
    cases = [()] + [(a,) for a in range(arms)]
    cases += list(itertools.combinations(range(arms), 2))
    result = {}
    for dead in cases:
        live = torch.ones(len(labels), arms, dtype=torch.bool)
        live[:, list(dead)] = False
        output, _ = brain(features, logits, live)
        name = "+".join(map(str, dead)) or "none"
        result[name] = float((output.argmax(1) == labels).float().mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if any(not 0 <= p <= 1 for p in args.p) or args.seeds < 1:
        parser.error("every --p must be within 0..1 and --seeds at least 1")
    torch.set_num_threads(args.threads)
    model = load_run(args.run_dir)
    config = model.config
    data = load_dataset(config.dataset, args.data_dir or config.data_dir)
    train_idx, val_idx = split_indices(
        len(data.x_train), config.val_size, config.seed, config.train_limit
    )
    started = time.perf_counter()
    splits = {}
    for name, index in (("train", train_idx), ("val", val_idx)):
        features, logits = arm_outputs(model, data.x_train[index])
        splits[name] = (features, logits, torch.from_numpy(data.y_train[index]).long())
        print(f"{name}: arm outputs of {len(index)} images", flush=True)
    rows = []
    for p in args.p:
        runs = []
        for seed in range(args.seeds):
            brain = train_brain(
                config, model.info.num_classes, splits["train"], p, seed
            )
            runs.append(score(brain, splits["val"], config.arms))
        normal = [r["none"] for r in runs]
        single = [
            min(v for k, v in r.items() if k != "none" and "+" not in k) for r in runs
        ]
        pair = [min(v for k, v in r.items() if "+" in k) for r in runs]
        rows.append(
            {
                "p": p,
                "val_normal": (float(np.mean(normal)), float(np.std(normal))),
                "val_worst_single": (float(np.mean(single)), float(np.std(single))),
                "val_worst_pair": (float(np.mean(pair)), float(np.std(pair))),
                "runs": runs,
            }
        )
        print(
            f"p {p:.2f}: validation normal {np.mean(normal):.4f} +- {np.std(normal):.4f}, "
            f"worst single {np.mean(single):.4f}, worst pair {np.mean(pair):.4f}",
            flush=True,
        )
    report = {
        "run_dir": str(args.run_dir),
        "seeds": args.seeds,
        "git_revision": git_revision(),
        "hardware": f"{platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads",
        "seconds": time.perf_counter() - started,
        "command": "python bench/module_dropout.py " + " ".join(argv or sys.argv[1:]),
        "rows": rows,
    }
    (args.run_dir / "module_dropout.json").write_text(
        json.dumps(report, indent=2) + "\n"
    )
    fig, axis = plt.subplots(figsize=(7, 4))
    ps = [r["p"] for r in rows]
    for key, label in [
        ("val_normal", "all arms"),
        ("val_worst_single", "worst single arm lost"),
        ("val_worst_pair", "worst pair lost"),
    ]:
        mean = np.array([r[key][0] for r in rows]) * 100
        spread = np.array([r[key][1] for r in rows]) * 100
        axis.errorbar(ps, mean, yerr=spread, marker="o", capsize=3, label=label)
    axis.set_xlabel("module dropout p (share of samples with arms masked)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title(f"Brain module dropout, {args.seeds} seeds each")
    axis.legend()
    fig.tight_layout()
    fig.savefig(args.run_dir / "module_dropout.png", dpi=120)
    print(f"written {args.run_dir / 'module_dropout.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
