"""`build-shards --executor ray`: the same shard tasks as the local executor, run as Ray tasks.

Each Ray task runs `build_one` on one whole shard: it reads the inputs, writes
the tar, publishes tar, index and journal record to DEST itself, and returns
its `ShardResult`. The driver (`build_shards`) plans the shards, skips those
already journalled (resume), and writes the rejects and the manifest last.
Because the plan and `build_one` are the same, the shards are byte-identical
to the local executor's for the same seed.

A task whose worker dies (a preempted node) is retried: `build_one` writes to
a temporary name and publishes atomically, so a retry cannot leave half a
shard. Errors raised by `build_one` itself are not retried; they reach the
driver with their own type and message. Ray is an optional extra
(`pip install 'stagewise[ray]'`).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from typing import Any

from stagewise.pipeline.plan import ShardResult, ShardTask, build_one

STALL_SECONDS = 3600.0  # give up when no task has finished for an hour (no CPUs joined, a hung store, ...)
CONNECT_SECONDS = 10.0  # to the head node's port, before handing the address to Ray
RETRIES = 3  # per task, when its worker process or node dies


def connect(ray_address: str | None) -> Any:
    """The `ray` module, initialized: an already-initialized Ray is kept as it is; `None` starts a
    local Ray with every core; otherwise `auto` or HOST:PORT of a running cluster."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'stagewise[ray]'") from None
    if not ray.is_initialized():
        if ray_address is None:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
        else:
            _check_reachable(ray_address)
            try:
                ray.init(address=ray_address)
            except ConnectionError as exc:
                raise ValueError(f"--ray-address {ray_address}: no Ray cluster reachable ({exc})") from None
    return ray


def _check_reachable(ray_address: str) -> None:
    """Fail fast: `ray.init` retries an unreachable HOST:PORT for minutes (measured: over 200 s)."""
    m = re.fullmatch(r"(?:ray://)?\[?(?P<host>[^\]]+?)\]?:(?P<port>\d+)", ray_address)
    if m is None:
        if ray_address != "auto":
            raise ValueError(f"--ray-address {ray_address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
        return
    try:
        socket.create_connection((m["host"], int(m["port"])), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        raise ValueError(f"--ray-address {ray_address}: cannot connect within {CONNECT_SECONDS:.0f} s "
                         f"({exc})") from None


def cluster_cpus() -> int:
    """CPUs the cluster offers now (at least 1, so that an autoscaling cluster still gets tasks)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def iter_done(refs: list, what: str) -> Iterator[tuple[int, Any]]:
    """(position in `refs`, value) as tasks finish; cancels the rest on error or stall."""
    import ray

    position = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=STALL_SECONDS)
            if not ready:
                raise TimeoutError(f"{what}: no Ray task finished for {STALL_SECONDS:.0f} s, "
                                   f"{len(pending)} pending; does the cluster have free CPUs?")
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in ready + more:
                yield position[ref], ray.get(ref)  # re-raises the task's own error type
    finally:
        for ref in pending:
            ray.cancel(ref)


def wait_all(refs: list, what: str) -> list:
    """The values of `refs`, in order."""
    values: list = [None] * len(refs)
    for i, value in iter_done(refs, what):
        values[i] = value
    return values


def run_on_ray(todo: list[ShardTask], ray_address: str | None) -> Iterator[ShardResult]:
    """Build every shard of `todo` as a Ray task; results in completion order."""
    if not todo:
        return
    ray = connect(ray_address)
    build = ray.remote(num_cpus=1, max_retries=RETRIES)(build_one)
    refs = [build.remote(task) for task in todo]
    for _, result in iter_done(refs, what=f"build-shards {todo[0].dest}"):
        yield result
