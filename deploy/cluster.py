"""Start or join Ray, create the named arm and brain actors, and tear everything down.

`Cluster` is a context manager: leaving it kills every actor it created and, when
it started Ray itself, shuts Ray down, on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from arms.actor import ArmActor
from brain.actor import BrainActor
from common.config import RunConfig
from common.datasets import DATASET_INFO, Dataset, split_indices

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 300.0
DEFAULT_DASHBOARD_PORT = 8265
DASHBOARD_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """Ray could not start, or the requested resources do not exist."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_gpus(requested: float) -> None:
    """Fail early when more GPUs are asked for than this machine has."""
    if requested <= 0:
        return
    import torch

    available = torch.cuda.device_count()
    if requested > available:
        raise ClusterError(
            f"--gpus {requested:g} asks for more GPUs than this machine has ({available}): "
            "pass --gpus 0 to run on CPU, or a count up to the number of GPUs"
        )


@dataclass
class Cluster:
    """The Ray session, the brain actor and the arm actors of one run."""

    config: RunConfig
    started_ray: bool = False
    dashboard_url: str = ""
    brain: object = None
    arms: list = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    actors: dict[str, object] = field(default_factory=dict)
    session_dir: str = ""
    process_ids: dict[str, int] = field(default_factory=dict)
    namespace: str = "octopusnet"
    ray_address: str = ""
    service: dict = field(default_factory=dict)
    data_ref: object = None
    arm_token: str = ""
    loaded_tag: str = ""  # the checkpoints every actor holds now; empty while training

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        config = self.config
        if config.address:
            context = self._init(
                lambda: ray.init(
                    address=config.address,
                    namespace=self.namespace,
                    log_to_driver=True,
                )
            )
        else:
            check_gpus(config.gpus)
            # Set first: a Ctrl-C inside ray.init still shuts down what it started.
            self.started_ray = True
            context = self._start_local()
        self.dashboard_url = context.dashboard_url or ""
        self.session_dir = context.address_info.get("session_dir", "")
        self.ray_address = context.address_info.get("gcs_address", config.address)
        log.info("Ray session %s", self.session_dir)
        if config.address:
            gpus = ray.cluster_resources().get("GPU", 0)
            if config.gpus > gpus:
                raise ClusterError(
                    f"--gpus {config.gpus:g} asks for more GPUs than the cluster at "
                    f"{config.address} has ({gpus:g})"
                )

    def _init(self, init):
        try:
            return init()
        except Exception as err:  # Ray raises ConnectionError, RuntimeError, ValueError
            where = "join " + self.config.address if self.config.address else "start"
            raise ClusterError(
                f"Ray failed to {where}: {err}. Check `ray status`, or stop a stale "
                "cluster with `ray stop`"
            ) from err

    def _start_local(self):
        """Start a local cluster on 127.0.0.1, with the dashboard on a free port.

        With dashboard_port 0 the usual 8265 is tried first. Another process may take
        a free port between the check and Ray's bind, so an automatic port is retried.
        """
        requested = self.config.dashboard_port
        if requested and not port_is_free(requested):
            raise ClusterError(
                f"the Ray dashboard port {requested} on 127.0.0.1 is in use (another "
                "Ray cluster?): pass another --dashboard-port, or 0 to pick a free one"
            )
        level = logging.getLevelName(logging.getLogger().level)
        port = requested or DEFAULT_DASHBOARD_PORT
        for attempt in range(1, DASHBOARD_ATTEMPTS + 1):
            if not requested and not port_is_free(port):
                port = free_port()
                log.info("the dashboard's usual port is in use; using %d", port)
            try:
                return ray.init(
                    address="local",
                    namespace=self.namespace,
                    num_cpus=int(self.config.cpus) if self.config.cpus else None,
                    num_gpus=int(self.config.gpus) if self.config.gpus else None,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    log_to_driver=True,
                    runtime_env={"env_vars": {"OCTOPUSNET_LOG_LEVEL": level}},
                )
            except Exception as err:  # Ray raises RuntimeError, ConnectionError
                ray.shutdown()
                if requested or attempt == DASHBOARD_ATTEMPTS or "port" not in str(err):
                    raise ClusterError(
                        f"Ray failed to start with its dashboard on 127.0.0.1:{port}: "
                        f"{err}. Retry, or name a free port with --dashboard-port"
                    ) from err
                log.warning("Ray failed to start (%s); retrying on another port", err)
                port = free_port()
        raise AssertionError("unreachable")

    def cpus(self) -> float:
        return self.config.cpus or ray.cluster_resources().get("CPU", 1.0)

    def create_actors(self, data: Dataset, run_dir: str) -> None:
        """Put the dataset in the object store once and start the brain and the arms."""
        config = self.config
        info = DATASET_INFO[config.dataset]
        train_idx, val_idx = split_indices(
            len(data.x_train), config.val_size, config.seed, config.train_limit
        )
        test_count = config.test_limit or len(data.x_test)
        arrays = {
            "x_train": data.x_train,
            "y_train": data.y_train,
            "x_test": data.x_test,
            "y_test": data.y_test,
            "train_idx": train_idx,
            "val_idx": val_idx,
            "test_idx": np.arange(min(test_count, len(data.x_test))),
        }
        self.split_sizes = {
            "train": len(train_idx),
            "val": len(val_idx),
            "test": len(arrays["test_idx"]),
        }
        # Held here for the whole run: a restarted arm is built from it again.
        self.data_ref = data_ref = ray.put(arrays)
        labels_ref = ray.put({"y_train": data.y_train, "y_test": data.y_test})

        cpu_share = self.cpus() / config.arms
        threads = max(1, int(cpu_share))
        config_dict = config.to_dict()
        # A fresh secret per run, passed through Ray (not the command line or the
        # run directory), so the brain can tell this run's arms from other senders.
        token = secrets.token_hex(16)
        self.brain = (
            ray.remote(BrainActor)
            .options(name="brain", num_cpus=0, max_concurrency=2)
            .remote(config_dict, info.num_classes, labels_ref, run_dir, token)
        )
        endpoint = self._get(self.brain.endpoint.remote(), "the brain")
        self.process_ids["brain"] = self._get(
            self.brain.process_id.remote(), "the brain"
        )
        for arm_id in range(config.arms):
            actor = self._arm_class(arm_id).remote(
                config_dict, arm_id, data_ref, run_dir, threads, endpoint, token
            )
            self.arms.append(actor)
        arm_pids = self._get([arm.process_id.remote() for arm in self.arms], "the arms")
        self.process_ids |= {f"arm-{i}": pid for i, pid in enumerate(arm_pids)}
        log.info(
            "actor processes: %s",
            " ".join(f"{name}={pid}" for name, pid in self.process_ids.items()),
        )
        self.actors = {"brain": self.brain} | {
            f"arm-{i}": arm for i, arm in enumerate(self.arms)
        }
        log.info(
            "started the brain and %d arms (%.2f CPUs, %d threads and %.2f GPUs each); "
            "%d training, %d validation, %d test images",
            config.arms,
            cpu_share,
            threads,
            config.gpus / config.arms,
            len(train_idx),
            len(val_idx),
            len(arrays["test_idx"]),
        )

    def write_info(self, run_dir: Path, **extra) -> Path:
        """Write how to reach this cluster, for deploy/kill_arm.py and the clients."""
        path = run_dir / "cluster.json"
        info = {
            "ray_address": self.ray_address,
            "namespace": self.namespace,
            "dashboard_url": self.dashboard_url,
            "driver_pid": os.getpid(),
            # Ray gives a restarted actor a new process: these are the first ones.
            "process_ids_at_start": self.process_ids,
            **extra,
        }
        # The file may hold the service token: readable by this user only.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info, indent=2) + "\n")
        return path

    def create_service(self, run_dir: str, tag: str) -> dict:
        """Start the brain and the arms as the inference service on `tag` checkpoints.

        The ports are fixed here, so a restarted brain binds the same ones and the
        arms and clients reconnect to it by themselves.
        """
        config = self.config
        info = DATASET_INFO[config.dataset]
        host = config.brain_host
        ports = {
            name: free_port(host) for name in ("pull_port", "pub_port", "client_port")
        }
        # Two secrets: the arms' token travels only through Ray; the clients' token
        # goes to cluster.json (mode 0600) for clients of the same user.
        token = self.arm_token = secrets.token_hex(16)
        client_token = secrets.token_hex(16)
        self.service = {
            "client_endpoint": f"tcp://{host}:{ports['client_port']}",
            "pull_endpoint": f"tcp://{host}:{ports['pull_port']}",
            "pub_endpoint": f"tcp://{host}:{ports['pub_port']}",
            "token": client_token,
            "tag": tag,
            "run_dir": run_dir,
            "dataset": config.dataset,
            "arms": config.arms,
        }
        self.brain = (
            ray.remote(BrainActor)
            .options(
                name="brain",
                num_cpus=0,
                max_concurrency=2,
                max_restarts=config.actor_restarts,
            )
            .remote(
                config.to_dict(),
                info.num_classes,
                None,
                run_dir,
                token,
                serve={**ports, "tag": tag, "client_token": client_token},
            )
        )
        self.process_ids["brain"] = self._get(
            self.brain.process_id.remote(), "the brain"
        )
        self.arms = [self.create_service_arm(arm_id) for arm_id in range(config.arms)]
        arm_pids = self._get([arm.process_id.remote() for arm in self.arms], "the arms")
        self.process_ids |= {f"arm-{i}": pid for i, pid in enumerate(arm_pids)}
        self.actors = {"brain": self.brain} | {
            f"arm-{i}": arm for i, arm in enumerate(self.arms)
        }
        log.info(
            "serving %s on %s; actor processes: %s",
            run_dir,
            self.service["client_endpoint"],
            " ".join(f"{name}={pid}" for name, pid in self.process_ids.items()),
        )
        return self.service

    def _arm_class(self, arm_id: int):
        """The arm actor class with arm `arm_id`'s name, resources and restarts."""
        config = self.config
        return ray.remote(ArmActor).options(
            name=f"arm-{arm_id}",
            # A second thread serves progress() and stats while the first works.
            max_concurrency=2,
            # A killed arm comes back and resumes from its last checkpoint.
            max_restarts=config.actor_restarts,
            num_cpus=self.cpus() / config.arms,
            num_gpus=config.gpus / config.arms if config.gpus else 0,
        )

    def create_service_arm(self, arm_id: int):
        """Start (or, after a kill without restart, start again) one serving arm."""
        actor = self._arm_class(arm_id).remote(
            self.config.to_dict(),
            arm_id,
            None,
            self.service["run_dir"],
            max(1, int(self.cpus() / self.config.arms)),
            self.service["pull_endpoint"],
            self.arm_token,
            serve={
                "pub_endpoint": self.service["pub_endpoint"],
                "tag": self.service["tag"],
            },
        )
        if arm_id < len(self.arms):
            self.arms[arm_id] = actor
            self.actors[f"arm-{arm_id}"] = actor
        return actor

    def _get(self, refs, what: str):
        try:
            return ray.get(refs, timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError as err:
            raise ClusterError(
                f"{what} did not start within {ACTOR_START_TIMEOUT_S:.0f} s: the cluster "
                "may lack the CPUs or GPUs asked for (see `ray status`)"
            ) from err
        except ray.exceptions.RayActorError as err:
            raise ClusterError(f"{what} failed to start: {err}") from err

    def stop(self) -> None:
        """Kill every actor this run created; shut Ray down if this run started it."""
        if ray.is_initialized():
            for actor in [*self.arms, self.brain]:
                if actor is None:
                    continue
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as err:  # an actor that already died raises here
                    log.debug("kill failed: %s", err)
        self.arms, self.brain, self.actors = [], None, {}
        if self.started_ray:
            # Also after an interrupted ray.init, which may have started processes.
            ray.shutdown()
            self.started_ray = False
            log.info("stopped the local Ray cluster")
