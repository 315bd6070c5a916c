"""Ray Train's torch backend with its rendezvous store and gloo on loopback when all workers share one local node.

Ray Train 2.60 (`ray.train.torch.config._TorchBackend.on_start`) points MASTER_ADDR/MASTER_PORT at rank 0's node
IP and a free port and calls `init_process_group(init_method="env://")`. torch's env:// handler then starts rank
0's TCPStore server, which listens on "::" (every interface) whatever host name it is given: torch 2.13 has no bind
address. Its one way in is `master_listen_fd`, a socket already bound and listening, which both the libuv and the
legacy server adopt (and close with the store); `init_process_group(init_method=...)` cannot pass it.

`LoopbackTorchConfig` is Ray's `TorchConfig` with one change: when every worker's node IP is 127.0.0.1 (a cluster
from `driver.start_local_ray`, or several such nodes on one machine), rendezvous goes through a `loopback://` URL,
whose handler (registered with `torch.distributed.register_rendezvous_handler` in each worker) creates the store
env:// would, on a socket bound to 127.0.0.1. The process group is then made by Ray's own
`_setup_torch_process_group` and torch's own `init_process_group` path (store timeout, "default_pg" prefix), so
gloo, NCCL and DeepSpeed (which adopts an existing process group) see the same store as before. The same path
points gloo's sockets at the loopback interface unless GLOO_SOCKET_IFNAME is set: gloo otherwise binds the address
the host name resolves to (loopback only where /etc/hosts maps it so; a container's IP in Docker). NCCL's own
bootstrap sockets are left alone (NCCL_SOCKET_IFNAME; by default NCCL prefers a non-loopback interface): that path
was not run on a GPU. Any other cluster (a node IP other than 127.0.0.1, a TPU backend, init_method="tcp") gets
Ray's behaviour unchanged.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qsl, urlparse

import ray
import torch.distributed as dist
from ray.train._internal.utils import get_address_and_port
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import (
    TorchConfig,
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

LOOPBACK = "127.0.0.1"
SCHEME = "loopback"


def loopback_interface() -> str | None:
    """The name of the interface holding 127.0.0.1 ("lo" on Linux, "lo0" on macOS and the BSDs), if there is one."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def _loopback_rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs) -> Iterator:
    """torch rendezvous handler for loopback://127.0.0.1:PORT?rank=R&world_size=N (torch adds the query).

    Makes the store `torch.distributed.rendezvous._create_c10d_store` makes for env:// (multi-tenant, waits for
    the workers, libuv unless USE_LIBUV=0), but rank 0's server adopts a socket bound to the URL's host."""
    parsed = urlparse(url)
    query = dict(parse_qsl(parsed.query))
    rank, world_size = int(query["rank"]), int(query["world_size"])
    listen_fd = None
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's own listener
        try:
            listener.bind((parsed.hostname, parsed.port))
            listener.listen(socket.SOMAXCONN)
        except OSError:
            listener.close()
            raise
        listen_fd = listener.detach()  # the store owns it from here and closes it when destroyed
    store = dist.TCPStore(
        parsed.hostname,
        parsed.port,
        world_size,
        rank == 0,
        timeout,
        multi_tenant=True,
        master_listen_fd=listen_fd,
        use_libuv=os.environ.get("USE_LIBUV", "1") == "1",
    )
    yield store, rank, world_size
    raise RuntimeError(f"{SCHEME}:// rendezvous cannot run again: a new TorchTrainer attempt starts new workers")


def _prepare_worker(port: int) -> None:
    """In each worker: the env:// variables for code that reads them, gloo on loopback, the rendezvous handler."""
    os.environ["MASTER_ADDR"] = LOOPBACK
    os.environ["MASTER_PORT"] = str(port)
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
    try:
        dist.register_rendezvous_handler(SCHEME, _loopback_rendezvous)
    except RuntimeError:  # an earlier process group of this worker process registered it
        pass


class _LoopbackTorchBackend(_TorchBackend):
    """`_TorchBackend` whose `on_start` rendezvous on loopback when every worker's node IP is 127.0.0.1."""

    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        backend = backend_config.backend
        if not dist.is_available() or backend in (None, "tpu_dist") or backend_config.init_method != "env":
            return super().on_start(worker_group, backend_config)
        if set(worker_group.execute(ray.util.get_node_ip_address)) != {LOOPBACK}:
            return super().on_start(worker_group, backend_config)
        # From here on, Ray's on_start for init_method="env" with the URL changed (ray/train/torch/config.py).
        _, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(_prepare_worker, port=port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        url = f"{SCHEME}://{LOOPBACK}:{port}"
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _setup_torch_process_group,
                    backend=backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    init_method=url,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


class LoopbackTorchConfig(TorchConfig):
    """`TorchConfig` (same fields) whose backend keeps rendezvous on loopback on a single 127.0.0.1 node.

    Pass a new one to each `TorchTrainer(torch_config=...)`: the trainer fills in `backend` on the instance."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
