"""The epoch loop of a distributed run, and evaluation of a saved run.

Each epoch: every arm trains its local epoch in parallel (no communication), then
the arms stream their training outputs to the brain, which trains, then the
validation split is streamed and scored. The epoch with the best validation
accuracy is kept, and the test split is scored once, at the end, with it.

With feedback, the trained brain's class probabilities for the training images go
back to the arms through Ray, the arms train their feedback gains on them, and a
second stream trains the pass-2 brain. Every split is scored through both passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import subprocess
import time
from pathlib import Path

import ray

from common.config import ConfigError, RunConfig
from common.datasets import load_dataset, split_indices
from common.logs import FORMAT
from deploy.cluster import Cluster, check_gpus
from deploy.progress import ProgressBoard

log = logging.getLogger(__name__)


def git_revision() -> str:
    """Return the repository commit, with `-dirty` when the work tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return revision + ("-dirty" if dirty else "")


RESUBMIT_PAUSE_S = 0.5


def _actor_gone(err: Exception) -> bool:
    """True when Ray will not bring the actor back (out of restarts, or killed for good)."""
    return isinstance(err, ray.exceptions.ActorDiedError)


def local_phase(cluster: Cluster, epoch: int, feedback=None) -> list[dict]:
    """Train every arm's local epoch; an arm that dies is retried after its restart.

    The arms train in separate processes, so a dead arm holds back no other arm: only
    this call waits for the restarted arm to catch up from its last checkpoint.
    With `feedback` (the brain's probabilities, or a Ray reference to them) the
    arms train their feedback gains instead.
    """
    arms = cluster.arms

    def submit(arm):
        if feedback is None:
            return arm.train_epoch.remote(epoch)
        return arm.train_feedback.remote(epoch, feedback)

    refs = {submit(arm): arm_id for arm_id, arm in enumerate(arms)}
    results: list[dict] = [{} for _ in arms]
    while refs:
        (ref,), _ = ray.wait(list(refs), num_returns=1)
        arm_id = refs.pop(ref)
        try:
            results[arm_id] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            if _actor_gone(err):
                raise
            log.warning(
                "arm %d died during its %s epoch %d (%s). Ray restarts it from its "
                "last checkpoint and it trains the epoch again, while the other arms "
                "go on",
                arm_id,
                "local" if feedback is None else "feedback",
                epoch,
                type(err).__name__,
            )
            _wait_restarted(arms[arm_id], arm_id)
            refs[submit(arms[arm_id])] = arm_id
    return results


def stream_and_gather(
    cluster: Cluster, split: str, stream_id: str, epoch: int, feedback=None
) -> dict:
    """Stream `split` from every arm into the brain; return the brain's result.

    If an arm dies while streaming, the brain drops the stream and, once Ray has
    restarted the arm, the whole split is streamed again under a new stream id.
    With `feedback` (the brain's pass-1 probabilities for `split`, or a Ray
    reference to them) the arms stream pass 2 and the pass-2 brain takes it.
    """
    for attempt in range(cluster.config.actor_restarts + 1):
        attempt_id = stream_id if not attempt else f"{stream_id}:retry{attempt}"
        result = _stream_once(cluster, split, attempt_id, epoch, feedback)
        if result is not None:
            return result
        time.sleep(RESUBMIT_PAUSE_S)
    raise RuntimeError(
        f"streaming {split} failed {cluster.config.actor_restarts + 1} times because "
        "arms kept dying; see the log above"
    )


def _stream_once(cluster: Cluster, split: str, stream_id: str, epoch: int, feedback):
    arm_ids = list(range(len(cluster.arms)))
    expected = -(-cluster.split_sizes[split] // cluster.config.batch_size)
    feedback_pass = feedback is not None
    if split == "train":
        brain_ref = cluster.brain.train_stream.remote(
            stream_id, arm_ids, epoch, expected, feedback_pass
        )
    else:
        brain_ref = cluster.brain.evaluate_stream.remote(
            stream_id, split, arm_ids, expected, feedback_pass
        )
    arm_refs = {
        arm.stream.remote(split, stream_id, feedback): arm_id
        for arm_id, arm in enumerate(cluster.arms)
    }
    pending = [brain_ref, *arm_refs]
    # Wait on all of them at once, so a dead brain or arm is seen at once.
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done)
        except ray.exceptions.RayActorError as err:
            if done[0] == brain_ref or _actor_gone(err):
                raise
            log.warning(
                "arm %d died while streaming %s (%s); the brain drops the stream, "
                "and it is streamed again once Ray has restarted the arm",
                arm_refs[done[0]],
                stream_id,
                type(err).__name__,
            )
            cluster.brain.abort.remote(stream_id)
            _drain(brain_ref, [r for r in pending if r != brain_ref])
            arm = cluster.arms[arm_refs[done[0]]]
            _wait_restarted(arm, arm_refs[done[0]])
            if cluster.loaded_tag:
                # A restarted arm resumes from `last`: give it the checkpoint the
                # others serve now (the final test uses `best`).
                ray.get(arm.load.remote(cluster.loaded_tag))
            return None
    return ray.get(brain_ref)


def _wait_restarted(arm, arm_id: int, timeout_s: float = 300.0) -> None:
    """Wait until Ray has restarted the arm, so a retry is not spent on the restart."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(arm.process_id.remote(), timeout=30)
            return
        except ray.exceptions.RayActorError as err:
            if _actor_gone(err) or time.monotonic() > deadline:
                raise
            time.sleep(RESUBMIT_PAUSE_S)
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"arm {arm_id} did not come back within {timeout_s:.0f} s"
                ) from None


def _drain(brain_ref, arm_refs) -> None:
    """Let the aborted brain call end, then the surviving arms' stream calls.

    The arms block on full send queues until a brain gather reads their frames;
    the next attempt's gather reads and drops them, so they are not waited for here.
    """
    try:
        ray.get(brain_ref)
    except Exception as err:  # StreamAbortedError, wrapped by Ray
        log.info("the brain dropped the stream: %s", type(err).__name__)
    ray.wait(arm_refs, num_returns=len(arm_refs), timeout=0)


def evaluate_split(cluster: Cluster, split: str, stream_id: str, epoch: int) -> dict:
    """Score `split`; in a feedback run through both passes.

    A feedback run's result is that of the pass-2 brain, with the pass-1 brain's
    accuracy as `pass1_accuracy`.
    """
    first = stream_and_gather(cluster, split, stream_id, epoch)
    if not cluster.config.feedback:
        return first
    probs = ray.put(first.pop("feedback"))
    second = stream_and_gather(
        cluster, split, f"{stream_id}:pass2", epoch, feedback=probs
    )
    return {**second, "pass1_accuracy": first["accuracy"]}


def feedback_phase(cluster: Cluster, epoch: int, brain_metrics: dict) -> dict:
    """Train the arms' feedback gains, then the pass-2 brain; return their metrics.

    `brain_metrics` is pass 1's training result: its `feedback` probabilities go
    to the arms through Ray's object store, never over the arms' sockets.
    """
    probs = ray.put(brain_metrics.pop("feedback"))
    arm_metrics = local_phase(cluster, epoch, feedback=probs)
    second = stream_and_gather(
        cluster, "train", f"train:{epoch}:pass2", epoch, feedback=probs
    )
    return {"arms_feedback": arm_metrics, **second}


def save_all(cluster: Cluster, tag: str) -> None:
    ray.get([actor.save.remote(tag) for actor in [*cluster.arms, cluster.brain]])


def load_all(cluster: Cluster, tag: str) -> list[int]:
    cluster.loaded_tag = tag
    return ray.get([actor.load.remote(tag) for actor in [*cluster.arms, cluster.brain]])


def append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_epochs(cluster: Cluster, metrics_path: Path) -> tuple[dict, list[float]]:
    """Train every epoch; keep `best` checkpoints by validation accuracy."""
    config = cluster.config
    best = {"val_accuracy": -1.0, "epoch": 0}
    epoch_seconds = []
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        arm_metrics = local_phase(cluster, epoch)
        local_seconds = time.perf_counter() - epoch_start
        brain_metrics = stream_and_gather(cluster, "train", f"train:{epoch}", epoch)
        if config.feedback:
            brain_metrics.update(feedback_phase(cluster, epoch, brain_metrics))
        val = evaluate_split(cluster, "val", f"val:{epoch}", epoch)
        save_all(cluster, "last")
        improved = val["accuracy"] > best["val_accuracy"]
        if improved:
            best = {"val_accuracy": val["accuracy"], "epoch": epoch}
            save_all(cluster, "best")
        seconds = time.perf_counter() - epoch_start
        epoch_seconds.append(seconds)
        record = {
            "epoch": epoch,
            "arms": arm_metrics,
            **brain_metrics,
            "val_accuracy": val["accuracy"],
            "val_arm_accuracy": val["arm_accuracy"],
            "val_mean_attention": val["mean_attention"],
            "local_seconds": local_seconds,
            "epoch_seconds": seconds,
        }
        if config.feedback:
            record["val_pass1_accuracy"] = val["pass1_accuracy"]
        append_jsonl(metrics_path, record)
        log.info(
            "epoch %d/%d: validation accuracy %.4f (arms %s)%s, %.1f s (local phase %.1f s)",
            epoch,
            config.epochs,
            val["accuracy"],
            " ".join(f"{a:.3f}" for a in val["arm_accuracy"]),
            " [best]" if improved else "",
            seconds,
            local_seconds,
        )

    return best, epoch_seconds


def check_sizes(config: RunConfig, data) -> None:
    """Raise ConfigError unless every split has images to train, select and test on."""
    train_idx, val_idx = split_indices(
        len(data.x_train), config.val_size, config.seed, config.train_limit
    )
    if len(train_idx) < config.batch_size:
        raise ConfigError(
            f"{len(train_idx)} training images make no batch of {config.batch_size}: "
            "raise --train-limit or lower --batch-size"
        )
    if not len(val_idx):
        raise ConfigError(
            "--val-size 0 leaves no validation images to choose the best epoch with"
        )
    if not len(data.x_test):
        raise ConfigError(f"the {config.dataset} test split is empty: nothing to score")


def create_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run directory {run_dir} already contains a run: pick another --run-name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def run_log(path: Path):
    """Copy every log record of the run into `path` while the context is open."""
    root = logging.getLogger()
    level = root.level
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    # A Python API caller may not have configured logging; the run log still gets INFO.
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def train(config: RunConfig, run_dir: Path, show_progress: bool = False) -> dict:
    """Train a run into `run_dir` and return its results (also written to results.json).

    The data and the GPUs are checked before `run_dir` is created, so a run that
    cannot start leaves nothing behind.
    """
    data = load_dataset(config.dataset, config.data_dir, config.download)
    check_sizes(config, data)
    if not config.address:
        check_gpus(config.gpus)
        if config.device == "cuda" and not config.gpus:
            raise ConfigError("--device cuda needs GPUs for the arms: pass --gpus N")
    create_run_dir(run_dir)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    with run_log(run_dir / "run.log"):
        log.info("run directory %s", run_dir.resolve())
        try:
            return _train(config, data, run_dir, show_progress)
        except KeyboardInterrupt:
            log.error("run interrupted; every actor was stopped")
            raise
        except Exception:
            log.exception("run failed; every actor was stopped")
            raise


def _train(config: RunConfig, data, run_dir: Path, show_progress: bool) -> dict:
    metrics_path = run_dir / "metrics.jsonl"
    started = time.perf_counter()

    with Cluster(config) as cluster:
        cluster.start()
        if cluster.dashboard_url:
            log.info(
                "Ray dashboard: http://%s (log in with the token that `ray get-auth-token` "
                "prints, when token authentication is on)",
                cluster.dashboard_url,
            )
        cluster.create_actors(data, str(run_dir))
        info_path = cluster.write_info(run_dir)
        board = ProgressBoard(cluster.actors, show_progress)
        with board:
            best, epoch_seconds = run_epochs(cluster, metrics_path)
            load_all(cluster, "best")
            test = evaluate_split(cluster, "test", "test", best["epoch"])
        info_path.unlink(missing_ok=True)

    results = {
        "test_accuracy": test["accuracy"],
        "test_arm_accuracy": test["arm_accuracy"],
        "test_arm_class_accuracy": test["arm_class_accuracy"],
        "test_class_attention": test["class_attention"],
        "class_names": list(data.class_names),
        "test_samples": test["samples"],
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "epoch_seconds": epoch_seconds,
        "total_seconds": time.perf_counter() - started,
        "git_revision": config.git_revision,
    }
    if config.feedback:
        results["test_pass1_accuracy"] = test["pass1_accuracy"]
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def evaluate(run_dir: Path, overrides: dict) -> dict:
    """Score the best checkpoints of a saved run on its validation and test splits."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: --eval needs a run directory written by training"
        )
    try:
        values = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}); restore it"
        ) from err
    config = dataclasses.replace(RunConfig.from_dict(values), **overrides)
    data = load_dataset(config.dataset, config.data_dir, config.download)
    with Cluster(config) as cluster:
        cluster.start()
        cluster.create_actors(data, str(run_dir))
        epochs = load_all(cluster, "best")
        val = evaluate_split(cluster, "val", "val:eval", epochs[0])
        test = evaluate_split(cluster, "test", "test:eval", epochs[0])
    results = {
        "epoch": epochs[0],
        "val_accuracy": val["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_arm_accuracy": test["arm_accuracy"],
        "test_samples": test["samples"],
    }
    if config.feedback:
        results["test_pass1_accuracy"] = test["pass1_accuracy"]
    return results
