"""Start the Ray workers: connect to (or start) a cluster, size the workers to its GPUs, load the model on each.

`start_cluster` runs before the bot logs in. Whatever stops it (an unreachable cluster, too few GPUs, a model
that does not load on a node) raises `ClusterError` with one line that names what to check; the actors it
made are gone by then. Importing this module loads Ray, never torch.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import ray
import ray.exceptions

from .errors import SDEngineError
from .info import ModelInfo
from .jobs import ExecutorConfig
from .ray_worker import ModelSpec, Ready, Worker, actor_options

log = logging.getLogger(__name__)

MAX_RESTARTS = 10  # times Ray restarts one worker after its process dies, over the bot's lifetime
READY_TIMEOUT = 600.0  # seconds for the workers to load the model (a first download of real weights is slow)
UNCAPPED = 1_000_000  # a worker's own queue caps: the bot's executor enforces the real ones
CONNECT_TIMEOUT = 5.0  # seconds for a TCP connection to the cluster's address, before Ray's own long wait


class ClusterError(SDEngineError):
    """The Ray cluster cannot be used; the message is one line that says what to check."""


@dataclass
class Cluster:
    """Workers with their model loaded, ready for a `RayExecutor`."""

    actors: list[Any]  # ray.actor.ActorHandle of `Worker`
    ready: list[Ready]
    info: ModelInfo
    address: str
    owns_ray: bool  # start_cluster connected Ray, so closing disconnects it

    def close(self) -> None:
        """Stop the workers and, if this process connected Ray, disconnect it."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as exc:  # already gone, or the cluster is unreachable: nothing left to stop here
                log.debug("could not kill a worker: %s", exc)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()


def start_cluster(
    address: str,
    workers: int,
    gpus_per_worker: float,
    spec: ModelSpec,
    config: ExecutorConfig,
    *,
    ready_timeout: float = READY_TIMEOUT,
    max_restarts: int = MAX_RESTARTS,
) -> Cluster:
    """Start `workers` workers (0: one per GPU of the cluster) and wait until each has loaded the model.

    `address` is "auto" (the cluster this node belongs to), "local" (start one in this process's machine),
    "ray://HOST:PORT" (Ray Client) or "HOST:PORT" (the head's GCS). If Ray is already connected in this
    process (tests do that), that connection is used and `address` only names it in messages.
    """
    owns_ray = not ray.is_initialized()
    if owns_ray:
        _connect(address)
    actors: list[Any] = []
    try:
        count = _worker_count(address, workers, gpus_per_worker)
        # The caps are the bot's, counted over every worker: a worker only gets jobs it has room for.
        config = replace(config, max_pending_per_owner=UNCAPPED, max_queued=UNCAPPED)
        remote = ray.remote(Worker).options(**actor_options(gpus_per_worker, max_restarts))
        actors = [remote.remote(spec, config) for _ in range(count)]
        log.info(
            "starting %d Ray workers at %s (%g GPUs each) with model %r", count, address, gpus_per_worker, spec.path
        )
        ready = _wait_ready(actors, spec, ready_timeout, count, gpus_per_worker)
        info = ready[0].info
        assert info is not None
        if len({_model_of(r.info) for r in ready}) > 1:
            raise ClusterError(
                f"the Ray workers loaded different models from {spec.path!r}: give every node the same model "
                "at that path"
            )
    except BaseException:
        Cluster(actors, [], ModelInfo("", 0, 0, False), address, owns_ray).close()
        raise
    for r in ready:
        log.info(
            "Ray worker pid %d on %s: model %r on %s (max_batch %d)", r.pid, r.node, info.name, r.info, r.max_batch
        )
    return Cluster(actors, ready, info, address, owns_ray)


def _connect(address: str) -> None:
    _check_reachable(address)
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    except Exception as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address!r} ({_first_line(exc)}): check [executor.ray] address "
            "and that the cluster is up (`ray status` on its head node)"
        ) from exc


def _check_reachable(address: str) -> None:
    """A HOST:PORT address that refuses TCP fails here at once; Ray itself would wait a minute or more."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ClusterError(f"the Ray address {address!r} has no HOST:PORT: check [executor.ray] address")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        why = "its name does not resolve" if isinstance(exc, socket.gaierror) else exc.strerror or type(exc).__name__
        if isinstance(exc, TimeoutError):
            why = "timed out"
        raise ClusterError(
            f"cannot reach the Ray cluster at {address!r} ({why}): check [executor.ray] address and that the "
            "cluster is up (`ray status` on its head node)"
        ) from exc


def _worker_count(address: str, workers: int, gpus_per_worker: float) -> int:
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    if workers == 0:
        if gpus_per_worker <= 0:
            raise ClusterError(
                "[executor.ray] workers = 0 starts one worker per GPU: with gpus_per_worker = 0, set workers"
            )
        count = int(gpus // gpus_per_worker)
        if count == 0:
            raise ClusterError(
                f"the Ray cluster at {address!r} has no GPUs: check that its nodes see their GPUs (`ray status`), "
                "or set [executor.ray] gpus_per_worker = 0 and workers = N to run on CPUs"
            )
    else:
        count = workers
        if count * gpus_per_worker > gpus:
            raise ClusterError(
                f"the Ray cluster at {address!r} has {gpus:g} GPUs, and {workers} workers with {gpus_per_worker:g} "
                f"each need {count * gpus_per_worker:g}: check the cluster's GPUs, or lower [executor.ray] workers"
            )
    if count > cpus:
        raise ClusterError(
            f"the Ray cluster at {address!r} has {cpus:g} CPUs, and each of the {count} workers needs one: "
            "lower [executor.ray] workers"
        )
    return count


def _wait_ready(actors: list[Any], spec: ModelSpec, timeout: float, count: int, gpus_per_worker: float) -> list[Ready]:
    try:
        ready: list[Ready] = ray.get([actor.ready.remote() for actor in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(
            f"the {count} Ray workers were not ready within {timeout:g} s: check that the cluster has "
            f"{count * gpus_per_worker:g} free GPUs and {count} free CPUs (`ray status`), and that [model] path "
            "loads on its nodes"
        ) from None
    except ray.exceptions.RayError as exc:
        raise ClusterError(
            f"a Ray worker died while loading the model {spec.path!r} ({_first_line(exc)}): check [model] path "
            "and the nodes' memory"
        ) from exc
    for r in ready:
        if r.error or r.info is None:
            raise ClusterError(
                f"the Ray worker on {r.node} cannot load the model {spec.path!r} ({r.error}): check [model] path "
                "and device on every node"
            )
    return ready


def _model_of(info: ModelInfo | None) -> ModelInfo | None:
    """What must agree across workers: everything but the device and dtype names."""
    return replace(info, device="", dtype="") if info is not None else None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
