"""Serve a trained run: the brain and the arms answer classification requests.

python -m deploy.serve RUN_DIR            # until Ctrl-C
python -m deploy.load RUN_DIR --rate 20   # in another terminal

The service's endpoints and token go to RUN_DIR/cluster.json (mode 0600), where
the client, deploy/load.py, deploy/kill_arm.py and deploy/chaos.py find them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import ray

from common.config import ConfigError, RunConfig
from common.logs import setup_logging
from deploy.cli import non_negative_int, positive_float, script_parser
from deploy.cluster import Cluster, ClusterError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 180.0


def read_run_config(run_dir: Path) -> RunConfig:
    """Read the config a run was trained with from RUN_DIR/config.json."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass a run directory written by `python launch.py`"
        )
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); restore it") from err
    return RunConfig.from_dict(values)


def check_servable(config: RunConfig, run_dir: Path) -> None:
    """Raise ConfigError for a feedback run, because the service runs one pass."""
    if config.feedback:
        raise ConfigError(
            f"run {run_dir} was trained with --feedback (feedback: true), and the "
            "service runs one pass, without the second: score it with "
            f"`python launch.py --eval {run_dir}` or deploy.api.load_run"
        )


class Service:
    """A local Ray cluster serving the `tag` checkpoints of `run_dir` (context manager)."""

    def __init__(self, run_dir: str | Path, overrides: dict | None = None, tag="best"):
        self.run_dir = Path(run_dir)
        config = read_run_config(self.run_dir)
        check_servable(config, self.run_dir)
        self.config = dataclasses.replace(config, **(overrides or {}))
        self.tag = tag
        self.cluster = Cluster(self.config)

    def __enter__(self) -> Service:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        checkpoints = self.run_dir / "checkpoints"
        missing = [
            name
            for name in [f"arm-{i}" for i in range(self.config.arms)] + ["brain"]
            if not (checkpoints / f"{name}-{self.tag}.pt").is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{checkpoints} lacks the {self.tag} checkpoints of {missing}: serve a "
                "run that finished training, or pass another --tag"
            )
        self.cluster.start()
        self.cluster.create_service(str(self.run_dir), self.tag)
        self.cluster.write_info(self.run_dir, service=self.cluster.service)
        self.wait_live(self.config.arms, START_TIMEOUT_S)

    def stats(self, timeout_s: float = 30.0) -> dict:
        return ray.get(self.cluster.brain.stats.remote(), timeout=timeout_s)

    def wait_live(self, count: int, timeout_s: float) -> dict:
        """Wait until at least `count` arms are live; return the brain's stats."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                stats = self.stats()
                if len(stats["live_arms"]) >= count:
                    return stats
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                stats = {}
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"only {stats.get('live_arms', [])} of {self.config.arms} arms became "
                    f"live within {timeout_s:.0f} s: see the actors' log lines above"
                )
            time.sleep(0.1)

    def brain_alive(self) -> bool:
        """False once the brain is dead for good (a restarting brain counts as alive)."""
        try:
            ray.get(self.cluster.brain.process_id.remote(), timeout=30)
        except ray.exceptions.ActorDiedError:
            return False
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        return True

    def stop(self) -> None:
        self.cluster.stop()
        (self.run_dir / "cluster.json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument(
        "run_dir", type=Path, help="a run directory written by launch.py"
    )
    defaults = RunConfig()
    parser.add_argument(
        "--tag",
        default="best",
        choices=["best", "last"],
        help="checkpoints to serve: best by validation, or the last epoch's",
    )
    parser.add_argument(
        "--cpus", type=non_negative_int, default=0, help="CPUs for Ray (0: all)"
    )
    parser.add_argument(
        "--deadline-s",
        type=positive_float,
        default=defaults.deadline_s,
        help="seconds a request waits for the arms; raise it on a busy host",
    )
    parser.add_argument(
        "--heartbeat-timeout-s",
        type=positive_float,
        default=defaults.heartbeat_timeout_s,
        help="seconds of silence after which an arm is dead; raise it on a busy host",
    )
    parser.add_argument(
        "--actor-restarts",
        type=non_negative_int,
        default=100,
        help="times Ray restarts a killed arm or brain before giving up",
    )
    parser.add_argument(
        "--dashboard-port",
        type=non_negative_int,
        default=0,
        help="Ray dashboard port on 127.0.0.1 (0: 8265, or a free one)",
    )
    args = parser.parse_args(argv)
    setup_logging("INFO")
    overrides = {
        "cpus": float(args.cpus),
        "dashboard_port": args.dashboard_port,
        "deadline_s": args.deadline_s,
        "heartbeat_timeout_s": args.heartbeat_timeout_s,
        "actor_restarts": args.actor_restarts,
    }

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with Service(args.run_dir, overrides, args.tag) as service:
            print(
                f"serving {args.run_dir} on {service.cluster.service['client_endpoint']}"
                f"; dashboard http://{service.cluster.dashboard_url}; Ctrl-C or "
                f"SIGTERM (kill {os.getpid()}) stops",
                flush=True,
            )
            while not stop.wait(5.0):
                if not service.brain_alive():
                    print(
                        "error: the brain died and Ray will not restart it again "
                        "(--actor-restarts used up); stopping the service",
                        file=sys.stderr,
                    )
                    return 1
    except KeyboardInterrupt:
        pass
    except (FileNotFoundError, ConfigError, ClusterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
