"""Train or evaluate OctopusNet as a distributed program: one Ray actor per arm.

python launch.py --arms 4 --gpus 0 --dataset cifar10 --epochs 1 --data-dir ../shared/data
python launch.py --eval runs/NAME
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.config import (
    ARM_TYPES,
    BRAIN_MODES,
    COMPETITIONS,
    COMPRESSIONS,
    DATASETS,
    DEVICES,
    PRECISIONS,
    ConfigError,
    RunConfig,
)
from common.datasets import default_data_dir
from common.logs import setup_logging

log = logging.getLogger("launch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser(
    description: str = "Train OctopusNet: arms as Ray actors with local "
    "Forward-Forward training, a brain that gathers their outputs over ZeroMQ.",
    saved_runs: bool = True,
) -> argparse.ArgumentParser:
    """Build the parser of every run option; scripts that train a config reuse it.

    `saved_runs` adds --eval and --report, which act on a saved run instead.
    """
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=description,
    )
    if saved_runs:
        parser.add_argument(
            "--eval", metavar="RUN_DIR", help="evaluate a saved run instead of training"
        )
        parser.add_argument(
            "--report",
            metavar="RUN_DIR",
            help="write figures and report.md for a finished run instead of training",
        )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (they are drawn only when stderr is a terminal)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=defaults.dataset, choices=DATASETS)
    data.add_argument(
        "--data-dir",
        default=None,
        help="directory with <dataset>.npz (default: $OCTOPUSNET_DATA_DIR or data)",
    )
    data.add_argument(
        "--download",
        action="store_true",
        help="download the dataset with torchvision when no .npz is found",
    )
    data.add_argument(
        "--val-size",
        type=int,
        default=defaults.val_size,
        help="training images held out for validation (model selection)",
    )
    data.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="use only this many training images (0: all)",
    )
    data.add_argument(
        "--test-limit",
        type=int,
        default=0,
        help="score only the first N test images (0: all)",
    )

    arms = parser.add_argument_group("arms")
    arms.add_argument(
        "--arms", type=int, default=defaults.arms, help="number of arm actors"
    )
    arms.add_argument(
        "--arm-type",
        default=defaults.arm_type,
        choices=ARM_TYPES,
        help="grouped: class-grouped conv channels; overlay: Fourier label overlay "
        "FF; residual: deeper class-grouped arm with parameter-free residual layers; "
        "transformer, lstm: class-grouped token channels or hidden units; "
        "heterogeneous: arm i is grouped, grouped, transformer, lstm by i %% 4",
    )
    arms.add_argument(
        "--no-multiscale",
        action="store_true",
        help="every arm sees full resolution instead of its --arm-scales share",
    )
    arms.add_argument(
        "--arm-scales",
        default=defaults.arm_scales,
        help="each arm's downscale factor, comma-separated, cycling over the arms "
        "(1,2,4,8 is the original's 32/16/8/4 px)",
    )
    arms.add_argument(
        "--width",
        type=int,
        default=defaults.width,
        help="channels of an arm's first block (doubled per block)",
    )
    arms.add_argument(
        "--depth",
        type=int,
        default=defaults.depth,
        help="blocks per arm (0: by resolution, 4 at 32 px)",
    )
    arms.add_argument(
        "--compress",
        default=defaults.compress,
        choices=COMPRESSIONS,
        help="halving between blocks: 2x2 max-pool, or a learned grouped stride-2 conv",
    )
    arms.add_argument(
        "--residual-blocks",
        type=int,
        default=defaults.residual_blocks,
        help="residual arms: same-width residual layers after each halving block",
    )
    arms.add_argument(
        "--goodness-layers",
        type=int,
        default=defaults.goodness_layers,
        help="grouped and residual arms predict from the goodness of this many last "
        "layers",
    )
    arms.add_argument(
        "--bottleneck",
        type=int,
        default=defaults.bottleneck,
        help="size of the feature vector an arm sends to the brain",
    )
    arms.add_argument(
        "--lr", type=float, default=defaults.lr, help="arms' learning rate"
    )
    arms.add_argument(
        "--threshold",
        type=float,
        default=defaults.threshold,
        help="goodness threshold of overlay arms",
    )
    arms.add_argument(
        "--label-strength",
        type=float,
        default=defaults.label_strength,
        help="weight of the label pattern in overlay arms' input (0 to 1)",
    )
    arms.add_argument(
        "--goodness-scale",
        type=float,
        default=defaults.goodness_scale,
        help="factor on per-class goodness before the cross-entropy",
    )
    arms.add_argument("--no-augment", action="store_true", help="no crop and flip")

    brain = parser.add_argument_group("brain")
    brain.add_argument(
        "--brain-mode",
        default=defaults.brain_mode,
        choices=BRAIN_MODES,
        help="attention: nerve ring and coordinator; logit: learned weights over the "
        "arms' local logits; ensemble: their average",
    )
    brain.add_argument(
        "--use-sff",
        action="store_true",
        help="fully local mode, the same as --brain-mode logit",
    )
    brain.add_argument(
        "--competition",
        default=defaults.competition,
        choices=COMPETITIONS,
        help="how the coordinator weighs the arms: softmax, top-k softmax, or hard Gumbel (argmax at evaluation)",
    )
    brain.add_argument(
        "--top-k",
        type=int,
        default=defaults.top_k,
        help="arms kept by --competition topk",
    )
    brain.add_argument(
        "--no-nerve-ring",
        action="store_true",
        help="skip the attention across arm vectors",
    )
    brain.add_argument(
        "--brain-lr",
        type=float,
        default=defaults.brain_lr,
        help="brain's AdamW learning rate",
    )
    brain.add_argument(
        "--brain-passes",
        type=int,
        default=defaults.brain_passes,
        help="passes over the streamed training outputs per epoch",
    )
    brain.add_argument(
        "--arm-dropout",
        type=float,
        default=defaults.arm_dropout,
        help="module dropout: share of training samples with 1 to N-1 arms masked",
    )
    brain.add_argument(
        "--feedback",
        action="store_true",
        help="two passes per image: the brain's class probabilities scale each arm's "
        "last output for the same image, and a second brain answers from the result",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--actor-restarts",
        type=int,
        default=defaults.actor_restarts,
        help="times Ray restarts a killed arm; it resumes from its last checkpoint",
    )
    run.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help="training epochs (arms and brain)",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="images per batch, in training and in streaming",
    )
    run.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the validation split, weights and batch order",
    )
    run.add_argument(
        "--device",
        default=defaults.device,
        choices=DEVICES,
        help="auto: cuda when an arm sees a GPU, else cpu",
    )
    run.add_argument(
        "--precision",
        default=defaults.precision,
        choices=PRECISIONS,
        help="auto: bf16 autocast on CUDA devices that support it, else fp32",
    )
    run.add_argument(
        "--gpus",
        type=float,
        default=defaults.gpus,
        help="GPUs for all arms together; each arm asks Ray for gpus/arms",
    )
    run.add_argument(
        "--cpus",
        type=float,
        default=defaults.cpus,
        help="CPUs for the local Ray cluster (0: all)",
    )
    run.add_argument(
        "--address",
        default=defaults.address,
        help="join the Ray cluster at this address instead of starting one",
    )
    run.add_argument(
        "--brain-host",
        default=defaults.brain_host,
        help="address the brain's ZeroMQ socket binds; anything but 127.0.0.1 needs --address",
    )
    run.add_argument(
        "--brain-port",
        type=int,
        default=defaults.brain_port,
        help="TCP port of the brain's ZeroMQ socket (0: any free port)",
    )
    run.add_argument(
        "--dashboard-port",
        type=int,
        default=defaults.dashboard_port,
        help="port of the Ray dashboard on 127.0.0.1 (0: 8265, or a free port when "
        "8265 is taken)",
    )
    run.add_argument(
        "--output-dir",
        default=defaults.output_dir,
        help="directory that receives run directories",
    )
    run.add_argument(
        "--run-name", default="", help="run directory name (default: time stamp)"
    )
    return parser


def build_config(args: argparse.Namespace) -> RunConfig:
    from deploy.training import git_revision

    return RunConfig(
        dataset=args.dataset,
        # Absolute, so that --eval finds the data from any working directory.
        data_dir=str(Path(args.data_dir or default_data_dir()).resolve()),
        download=args.download,
        val_size=args.val_size,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        arms=args.arms,
        arm_type=args.arm_type,
        multiscale=not args.no_multiscale,
        arm_scales=args.arm_scales,
        width=args.width,
        depth=args.depth,
        compress=args.compress,
        residual_blocks=args.residual_blocks,
        goodness_layers=args.goodness_layers,
        bottleneck=args.bottleneck,
        lr=args.lr,
        threshold=args.threshold,
        label_strength=args.label_strength,
        goodness_scale=args.goodness_scale,
        augment=not args.no_augment,
        brain_mode="logit" if args.use_sff else args.brain_mode,
        competition=args.competition,
        top_k=args.top_k,
        nerve_ring=not args.no_nerve_ring,
        brain_lr=args.brain_lr,
        brain_passes=args.brain_passes,
        arm_dropout=args.arm_dropout,
        feedback=args.feedback,
        actor_restarts=args.actor_restarts,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        gpus=args.gpus,
        cpus=args.cpus,
        address=args.address,
        brain_host=args.brain_host,
        brain_port=args.brain_port,
        dashboard_port=args.dashboard_port,
        output_dir=args.output_dir,
        run_name=args.run_name or time.strftime(f"%Y%m%d-%H%M%S-{args.dataset}"),
        git_revision=git_revision(),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Decided before Ray starts, because Ray's log forwarding wraps sys.stderr.
    show_progress = not args.quiet and sys.stderr.isatty()
    setup_logging(args.log_level)
    try:
        from deploy import training

        if args.report:
            from deploy.report import write_report

            print(f"report written to {write_report(Path(args.report))}")
            return 0

        if args.eval:
            # Where and how to run may differ from training; the model's settings may not.
            overrides = {
                "dashboard_port": args.dashboard_port,
                "address": args.address,
                "brain_host": args.brain_host,
                "brain_port": args.brain_port,
                "cpus": args.cpus,
                "gpus": args.gpus,
                "device": args.device,
            }
            if args.data_dir:
                overrides["data_dir"] = args.data_dir
            results = training.evaluate(Path(args.eval), overrides)
            print(json.dumps(results, indent=2))
            print(
                f"validation accuracy {results['val_accuracy']:.4f}, "
                f"test accuracy {results['test_accuracy']:.4f}"
            )
            return 0

        config = build_config(args)
        run_dir = Path(config.output_dir) / config.run_name
        results = training.train(config, run_dir, show_progress)
    except KeyboardInterrupt:
        print("interrupted: every actor was stopped", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        log.debug("failure", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        import ray.exceptions

        if not isinstance(err, ray.exceptions.RayError):
            raise
        log.error("actor failure", exc_info=True)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        print(
            f"error: an actor failed and the run stopped ({type(err).__name__}: "
            f"{first_line}). Every actor was stopped; checkpoints of finished epochs "
            "are in the run directory, and the traceback in its run.log",
            file=sys.stderr,
        )
        return 1

    print(
        f"best epoch {results['best_epoch']}: validation accuracy "
        f"{results['best_val_accuracy']:.4f}"
    )
    print(
        f"test accuracy {results['test_accuracy']:.4f} on {results['test_samples']} images"
    )
    print(f"results in {run_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
