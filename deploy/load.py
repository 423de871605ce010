"""Stream real test images to the inference service at a set rate; record every answer.

python -m deploy.load RUN_DIR --rate 20 --batch-size 16 --requests 500

Each answer (or refusal, or loss after the client's retries) becomes one line of
RUN_DIR/load-<time>.jsonl. At the end a summary is printed and written beside it,
including the effect of any kill that deploy/kill_arm.py made meanwhile.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.datasets import DatasetError, load_dataset
from deploy.cli import (
    add_load_arguments,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    script_parser,
)
from deploy.client import ServiceClient, ServiceError
from deploy.serve import read_run_config
from deploy.timeline import format_summary, summarize


def load_test_split(run_dir: Path, data_dir: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Load the test split of the run's dataset as uint8 (N, H, W, C) and labels."""
    config = read_run_config(run_dir)
    data = load_dataset(config.dataset, data_dir or config.data_dir, config.download)
    images = data.x_test if data.x_test.ndim == 4 else data.x_test[..., None]
    return images, data.y_test


def run_load(
    client: ServiceClient,
    images: np.ndarray,
    labels: np.ndarray,
    rate: float,
    batch_size: int,
    requests: int = 0,
    duration_s: float = 0.0,
    stop: threading.Event | None = None,
    show_progress: bool = False,
    max_in_flight: int = 0,
) -> list[dict]:
    """Send `requests` requests (or for `duration_s`) at `rate` per second.

    Returns one record per request, once every request is answered, refused or
    lost. Request i carries images i*batch_size onwards, cycling over the set.
    With `max_in_flight`, no request is sent while that many await their answers.
    """
    if rate <= 0 or batch_size < 1 or (requests < 1 and duration_s <= 0):
        raise ValueError(
            f"rate {rate} must be > 0, batch size {batch_size} >= 1, and requests "
            f"{requests} >= 1 or duration {duration_s} s > 0"
        )
    stop = stop or threading.Event()
    records: list[dict] = []
    started = time.monotonic()
    sent = 0
    bar = tqdm(total=requests or None, unit="req", disable=not show_progress)

    def collect(timeout_s: float) -> None:
        for answer, meta in client.poll(timeout_s):
            hits = 0
            if not answer.error:
                hits = int((answer.predictions == meta["labels"]).sum())
            records.append(
                {
                    "request_id": answer.request_id,
                    "first_image": meta["first_image"],
                    "images": len(meta["labels"]),
                    "sent": answer.sent_s,
                    "answered": answer.answered_s,
                    "attempts": answer.attempts,
                    "arm_ids": answer.arm_ids,
                    "degraded": answer.degraded,
                    "error": answer.error,
                    "lost": answer.lost,
                    "correct": hits,
                    "latency_ms": answer.latency_ms,
                }
            )
            bar.update(1)

    while not stop.is_set():
        elapsed = time.monotonic() - started
        if (requests and sent >= requests) or (duration_s and elapsed >= duration_s):
            break
        due = started + sent / rate
        if time.monotonic() < due:
            collect(max(0.0, due - time.monotonic()))
            continue
        if max_in_flight and len(client.pending) >= max_in_flight:
            collect(0.05)
            continue
        index = (np.arange(batch_size) + sent * batch_size) % len(images)
        client.submit(
            np.ascontiguousarray(images[index]),
            first_image=int(index[0]),
            labels=labels[index],
        )
        sent += 1
    while client.pending:
        collect(0.05)
    bar.close()
    return records


def read_faults(run_dir: Path) -> list[dict]:
    path = run_dir / "faults.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    add_load_arguments(parser)
    parser.add_argument(
        "--requests", type=non_negative_int, default=500, help="0: use --duration-s"
    )
    parser.add_argument(
        "--duration-s", type=non_negative_float, default=0.0, help="seconds to send for"
    )
    parser.add_argument(
        "--retry-s",
        type=positive_float,
        default=2.0,
        help="seconds before a request is resent",
    )
    parser.add_argument(
        "--max-attempts",
        type=positive_int,
        default=10,
        help="unanswered sends (or times --retry-s seconds) before a request is lost",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        images, labels = load_test_split(args.run_dir, args.data_dir)
        client = ServiceClient.from_run(
            args.run_dir, retry_s=args.retry_s, max_attempts=args.max_attempts
        )
    except (FileNotFoundError, DatasetError, ServiceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with client:
        try:
            records = run_load(
                client,
                images,
                labels,
                args.rate,
                args.batch_size,
                args.requests,
                args.duration_s,
                show_progress=not args.quiet and sys.stderr.isatty(),
            )
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    config = read_run_config(args.run_dir)
    summary = summarize(records, read_faults(args.run_dir), config.arms)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.run_dir / f"load-{stamp}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    (args.run_dir / f"load-{stamp}-summary.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    print(format_summary(summary))
    print(f"answers in {out}")
    if summary["lost"]:
        print(f"{summary['lost']} requests lost: exit status 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
