"""Waiting for an autoscaling cluster to start the nodes a run needs (`cluster.scale_up_timeout_s`).

A cluster from cluster.yaml starts with its GPU nodes at zero; Ray's autoscaler adds them when resources are
asked for. `train` and `sweep` check the cluster's resources before anything heavy runs, so on such a cluster they
would refuse (or, with train.use_gpu=auto, train on the head's CPUs). With a timeout they ask the autoscaler for the
run's bundles (`ray.autoscaler.sdk.request_resources`, a standing request; on a cluster without an autoscaler
nothing happens) and wait for them to appear.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from raytune_llm.config import RunConfig
from raytune_llm.train.errors import UserError


def wait_for_resources(
    cfg: RunConfig, gpus: float, cpus: float, log: Callable[[str], None] = print, poll_s: float = 5.0
) -> dict[str, float]:
    """The cluster's resources once it has `gpus` GPUs and `cpus` CPUs, or after `cluster.scale_up_timeout_s`.

    Args:
        cfg: the run's config (cluster.scale_up_timeout_s, train.num_workers, train.cpus_per_worker).
        gpus: GPUs the run needs (0: none).
        cpus: CPUs the run needs.
        log: where the one line saying what it waits for goes.
        poll_s: seconds between looks at the cluster.

    Returns:
        `ray.cluster_resources()` as last seen (the caller checks it and refuses the run when it still falls short).

    Raises:
        UserError: a wait asked for from a ray:// client.
    """
    import ray

    res = ray.cluster_resources()
    timeout = cfg.cluster.scale_up_timeout_s
    if timeout <= 0 or _enough(res, gpus, cpus):
        return res
    from ray.autoscaler.sdk import request_resources
    from ray.util.client import ray as client

    if client.is_connected():  # the request goes through the driver's GCS client, which a ray:// client lacks
        raise UserError(
            "cluster.scale_up_timeout_s needs the driver on the cluster (ray job submit), not a ray:// client"
        )
    n = cfg.train.num_workers
    bundle = {"CPU": cfg.train.cpus_per_worker, **({"GPU": gpus / n} if gpus else {})}
    request_resources(bundles=[dict(bundle) for _ in range(n)])
    try:
        log(
            f"[raytune-llm] waiting up to {timeout:g} s (cluster.scale_up_timeout_s) for {gpus:g} GPUs and {cpus:g} "
            f"CPUs; the cluster has {res.get('GPU', 0):g} and {res.get('CPU', 0):g}"
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            res = ray.cluster_resources()
            if _enough(res, gpus, cpus):
                break
    finally:
        # Withdrawn however the wait ends (met, timed out, Ctrl-C): the run's placement groups hold the nodes from
        # here (an idle node stays up for the cluster's idle_timeout_minutes) and a refused run leaves no standing
        # request. The request is the cluster's one standing request, so this also clears another job's.
        request_resources(bundles=[])
    return res


def _enough(res: dict, gpus: float, cpus: float) -> bool:
    return float(res.get("GPU", 0)) + 1e-9 >= gpus and float(res.get("CPU", 0)) + 1e-9 >= cpus
