"""Start a training run: on Ray (a local cluster, or the one RAY_ADDRESS / ``address`` names) or in-process.

The output folder is ``<ray.storage_path>/<name>/`` (local, shared, or remote through fsspec; see
:mod:`.outputs`): the resolved config, ``metrics.jsonl``, TensorBoard curves, checkpoints and the exported
``model.pt``. Rerunning the same command resumes from the last
checkpoint there and continues the schedule. A stop request (SIGUSR1 / SIGTERM; see :mod:`.stop`) saves a
checkpoint at the current step and raises :class:`~.stop.Preempted`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..config import RunConfig, save_config
from ..errors import ClusterResourcesError, RunAborted
from . import stop
from .checkpoint import LocalPersistence
from .loop import ABORTED, ray_train_loop, run_worker
from .outputs import RunOutput, is_remote, run_location

log = logging.getLogger("distpddm.train")


def free_port() -> int:
    """A TCP port free on this host now (for a single-host process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_ray_worker() -> None:
    """Every Ray worker process of a run (``worker_process_setup_hook``): quiet logs, gloo's interface."""
    quiet_local_ray()
    use_node_interface()


def quiet_local_ray() -> None:
    """Ray's noise in a run's logs. With no dashboard (the local cluster; ``ray start --include-dashboard
    false``) there is no state API, and Ray Train's placement-group cleaner warns that it cannot reach it every
    second of the run; with no autoscaler, the controller's resource request times out with a traceback while
    the workers start; each worker also logs every report's whole metrics dict (from a logger named after its
    file, outside the ``ray`` hierarchy)."""
    for name in (
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its INFO lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def use_node_interface() -> None:
    """gloo binds to the address the hostname resolves to, and to loopback when that address is not local: on
    hosts whose hostname does not resolve to their cluster address the ranks would never reach each other.
    Unless GLOO_SOCKET_IFNAME is set, name the interface holding this node's Ray address."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    import psutil
    import ray

    ip = ray.util.get_node_ip_address()
    if ip.startswith("127.") or ip == "::1":
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def connect_ray(address: str | None, num_cpus: int) -> bool:
    """Connect this driver to the Ray cluster at ``address`` (or RAY_ADDRESS), else to a new local cluster of
    at least ``num_cpus`` CPUs. Returns whether it connected here (the caller then disconnects when done); a
    driver already connected is left as it is."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"worker_process_setup_hook": "distpddm.train.launch.setup_ray_worker"})
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, num_cpus),
            include_dashboard=False,
            # Ray's INFO lines (every report's whole metrics dict) drown the progress bar; warnings stay.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            runtime_env={"worker_process_setup_hook": "distpddm.train.launch.setup_ray_worker"},
        )
    return True


def _bundle(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def missing_resources(
    nodes: list[tuple[str, dict[str, float]]], per_worker: dict[str, float], workers: int, strategy: str
) -> str | None:
    """None when the alive ``nodes`` (address, total resources) can host ``workers`` bundles of
    ``per_worker`` placed by ``strategy``; else what is missing, in words."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    fits = [min((int(res.get(k, 0) // v) for k, v in need.items()), default=workers) for _, res in nodes]
    if strategy == "STRICT_SPREAD":
        hostable, missing = sum(f >= 1 for f in fits), f"{workers - sum(f >= 1 for f in fits)} more node(s) with"
    elif strategy == "STRICT_PACK":
        hostable, missing = max(fits, default=0), f"one node with {workers} x"
    else:
        hostable, missing = sum(fits), f"{workers - sum(fits)} more bundle(s) of"
    if hostable >= workers:
        return None
    where = {"STRICT_SPREAD": f" over {workers} nodes", "STRICT_PACK": " on one node"}.get(strategy, "")
    have = "; ".join(f"{ip} {_bundle({k: res.get(k, 0) for k in need})}" for ip, res in nodes) or "none"
    return (
        f"the run needs {workers} bundles of {_bundle(per_worker)} {strategy}{where} (ray.num_workers, "
        f"ray.cpus_per_worker, ray.use_gpu, ray.placement_strategy); the cluster has {len(nodes)} alive node(s) "
        f"({have}), which host {hostable}: missing {missing} {_bundle(need)}"
    )


class ResourceWatch:
    """A bound on the wait for resources: Ray Train waits for ever for a placement group it cannot get (no
    run yet, or a restart after a lost node), and its controller takes no abort while it waits. When the alive
    nodes cannot host the workers for ``ray.resources_timeout_s`` seconds in a row, the watch ends this job's
    Ray Train controller (its workers and placement group go with it) and ``fit`` returns with an error that
    :func:`train_ray` turns into :class:`ClusterResourcesError` naming what is missing."""

    def __init__(self, cfg: RunConfig, poll_s: float = 2.0):
        self.timeout, self.poll = cfg.ray.resources_timeout_s, poll_s
        self.per_worker = {"CPU": float(cfg.ray.cpus_per_worker)} | ({"GPU": 1.0} if cfg.ray.use_gpu else {})
        self.workers, self.strategy = cfg.ray.num_workers, cfg.ray.placement_strategy
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def missing(self) -> str | None:
        import ray

        nodes = [(n["NodeManagerAddress"], n["Resources"]) for n in ray.nodes() if n["Alive"]]
        return missing_resources(nodes, self.per_worker, self.workers, self.strategy)

    def _expired(self, why: str) -> str:
        return f"{why}; waited {self.timeout:g} s (ray.resources_timeout_s): add or restart the missing nodes"

    def wait_until_fit(self) -> None:
        """Before the run: until the cluster can host it (nodes still joining), at most the timeout."""
        if self.timeout is None:
            return
        end, told = time.monotonic() + self.timeout, False
        while (why := self.missing()) is not None:
            if time.monotonic() >= end:
                raise ClusterResourcesError(self._expired(why))
            if not told:
                log.warning("waiting up to %g s for resources: %s", self.timeout, why)
                told = True
            time.sleep(self.poll)

    def __enter__(self) -> ResourceWatch:
        if self.timeout is not None:
            self._thread = threading.Thread(target=self._watch, name="distpddm-resource-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @staticmethod
    def _end_controller() -> None:
        """Kill this job's Ray Train controller: Ray has no public handle on it, and its abort waits behind
        the placement group it cannot get."""
        import ray
        from ray._private import state
        from ray._private.worker import global_worker

        job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        for actor in state.actors(job_id=job, actor_state_name="ALIVE").values():
            if actor["ActorClassName"].endswith("TrainController"):
                global_worker.core_worker.kill_actor(ray.ActorID.from_hex(actor["ActorID"]), True)

    def _watch(self) -> None:
        since = None
        while not self._stop.wait(self.poll):
            try:
                why = self.missing()
            except Exception:  # the driver is disconnecting: nothing left to watch
                return
            if why is None:
                since = None
                continue
            if since is None:
                since = time.monotonic()
                log.warning("the cluster cannot host the run now: %s", why)
            elif time.monotonic() - since >= self.timeout:
                self.reason = self._expired(why)
                log.warning("ending the run: the cluster could not host it for %g s", self.timeout)
                try:
                    self._end_controller()
                except Exception as e:  # Ray's private state API changed: say so rather than hang silently
                    log.error("could not end the run's Ray Train controller (%s: %s); stop it with Ctrl-C",
                              type(e).__name__, e)  # fmt: skip
                return


def train_local(cfg: RunConfig) -> dict:
    """One process (or every process of a torchrun launch): no Ray, the same worker code. SIGUSR1 / SIGTERM
    to any process stop the run at the next step with a checkpoint (:class:`~.stop.Preempted`)."""
    if is_remote(cfg.ray.storage_path):
        raise ValueError(
            f"ray.storage_path={cfg.ray.storage_path!r} is remote: --local keeps checkpoints in a local or shared "
            "folder. Train through Ray for remote storage, or give a local path."
        )
    out = RunOutput(cfg.output_location())
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # plain single process: a world of one for DeepSpeed
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")  # fmt: skip
        backend = "nccl" if cfg.ray.use_gpu else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    if dist.get_rank() == 0:
        save_config(cfg, out.local / "config.yaml")
        stop.clear(out)
    previous = stop.install()
    try:
        metrics = run_worker(cfg, LocalPersistence(out.local, cfg.train.keep_checkpoints), out)
    finally:
        stop.restore(previous)
        dist.destroy_process_group()
    if metrics.pop("preempted", False):  # every rank alike
        raise stop.Preempted(metrics["step"], out.location)
    return metrics


def train_ray(cfg: RunConfig, address: str | None = None):
    """Ray Train's TorchTrainer with ``ray.num_workers`` workers placed by ``ray.placement_strategy``; restarts
    failed workers from the last checkpoint up to ``ray.max_failures`` times. A deterministic failure (bad data,
    non-finite losses, a config that cannot work) spends no retry: it raises :class:`RunAborted` with the
    workers' message. A cluster that cannot host the workers for ``ray.resources_timeout_s`` (a lost node not
    back) raises :class:`ClusterResourcesError`. SIGUSR1 / SIGTERM to this process write the run folder's
    stop request: the workers checkpoint and return, and this raises :class:`~.stop.Preempted`."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    started_here = connect_ray(address, cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    out = RunOutput(run_location(storage, cfg.name))
    save_config(cfg, out.local / "config.yaml")
    out.remove(ABORTED)  # an earlier attempt's; this one writes its own if it must stop
    stop.clear(out)
    out.push()
    resources = {"CPU": cfg.ray.cpus_per_worker}
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": cfg.to_dict(), "output": out.location,
                           "deepspeed": json.loads(Path(cfg.train.deepspeed).read_text())},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=cfg.ray.placement_strategy),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        ),
    )  # fmt: skip
    watch = ResourceWatch(cfg)
    # After ray.init, which sets its own SIGTERM handler (exit at once).
    previous = stop.install(lambda signum, _frame: _request_stop(out, signum))
    if stop.pending():  # a signal while Ray started
        _request_stop(out, None)
    try:
        watch.wait_until_fit()
        with watch:
            try:
                result = trainer.fit()
            except Exception:
                if watch.reason is None:
                    raise
        if watch.reason is not None:
            raise ClusterResourcesError(watch.reason)
        aborted = out.read_text(ABORTED)
        preempted = stop.read_preempted(out)
    finally:
        stop.restore(previous)
        out.close()
        if started_here:  # leave no local cluster (or a recovered run's leftovers) waiting at exit
            ray.shutdown()
    if aborted:
        why = json.loads(aborted)
        raise RunAborted(f"{why['error']}: {why['message']}")
    if preempted is not None:
        raise stop.Preempted(preempted, out.location)
    return result


def _request_stop(out: RunOutput, signum: int | None) -> None:
    """The driver's signal handler: the workers (elsewhere) see the request in the run folder."""
    import signal
    import threading

    what = signal.Signals(signum).name if signum else "a stop request"
    log.warning("%s: the workers save a checkpoint at their next step, then stop", what)
    threading.Thread(target=out.write_text, args=(stop.STOP_REQUEST, what), daemon=False).start()
