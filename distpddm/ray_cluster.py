"""Ray as distpddm uses it, for training and evaluation alike: connecting a driver (:func:`connect_ray`),
each worker's set-up hook, building and fitting a ``TorchTrainer`` (:func:`torch_trainer`, :func:`fit`), and
bounding the wait for resources a cluster cannot give (:class:`ResourceWatch`).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from .errors import ClusterResourcesError

log = logging.getLogger("distpddm.ray")

SETUP_HOOK = "distpddm.ray_cluster.setup_ray_worker"


class TrainingFailed(RuntimeError):
    """Ray Train gave up on the workers (after ``ray.max_failures`` restarts, or at once for a worker error
    it does not retry); the message is Ray's, on one line."""


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
        ray.init(address=address, runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    else:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, num_cpus),
            include_dashboard=False,
            # Ray's INFO lines (every report's whole metrics dict) drown the progress bar; warnings stay.
            logging_config=ray.LoggingConfig(log_level="WARNING"),
            runtime_env={"worker_process_setup_hook": SETUP_HOOK},
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
    :func:`distpddm.train.launch.train_ray` turns into :class:`ClusterResourcesError` naming what is missing."""

    def __init__(self, ray_cfg, poll_s: float = 2.0):
        self.timeout, self.poll = ray_cfg.resources_timeout_s, poll_s
        self.per_worker = {"CPU": float(ray_cfg.cpus_per_worker)} | ({"GPU": 1.0} if ray_cfg.use_gpu else {})
        self.workers, self.strategy = ray_cfg.num_workers, ray_cfg.placement_strategy
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


def torch_trainer(
    loop,
    loop_config: dict,
    *,
    name: str,
    storage_path: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float = 1,
    placement_strategy: str = "PACK",
    max_failures: int = 0,
    keep_checkpoints: int | None = None,
):
    """A ``TorchTrainer`` running ``loop(loop_config)`` on every worker: gloo on CPUs, NCCL on GPUs."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


def fit(trainer):
    """``trainer.fit()``; Ray 2.60 raises ``TrainingFailedError`` when the workers fail for good (the result's
    ``error`` is then never set): that becomes :class:`TrainingFailed` with Ray's message on one line."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        first = str(e).strip().splitlines()
        raise TrainingFailed(first[0] if first else type(e).__name__) from e
