"""`train.loopback`: which clusters take the loopback rendezvous, and the store it makes (no Ray cluster needed).

The 2-worker fit whose every socket is on loopback is `test_reliability.test_training_listens_on_loopback_only`."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import psutil
import pytest

from raytune_llm.train import loopback


class FakeGroup:
    """The worker-group calls `_LoopbackTorchBackend.on_start` makes, answered in-process, for one node IP each."""

    def __init__(self, ips):
        self.ips = ips
        self.calls = []

    def __len__(self):
        return len(self.ips)

    def execute(self, fn, *args, **kwargs):
        self.calls.append(fn.__name__)
        return list(self.ips) if fn.__name__ == "get_node_ip_address" else [None] * len(self.ips)


@pytest.fixture
def ray_on_start(monkeypatch):
    """Records calls of Ray's own `_TorchBackend.on_start` instead of running it."""
    seen = []
    monkeypatch.setattr(loopback._TorchBackend, "on_start", lambda self, group, config: seen.append(config))
    return seen


@pytest.mark.parametrize(
    ("ips", "backend", "init_method"),
    [
        (["127.0.0.1", "10.0.0.7"], "gloo", "env"),  # a second node elsewhere
        (["192.0.2.2", "192.0.2.2"], "nccl", "env"),  # one node, on its routable IP (a joined cluster)
        (["127.0.0.1", "127.0.0.1"], "gloo", "tcp"),
        (["127.0.0.1", "127.0.0.1"], "tpu_dist", "env"),
    ],
)
def test_other_clusters_get_rays_backend_unchanged(ray_on_start, ips, backend, init_method):
    group = FakeGroup(ips)
    config = loopback.LoopbackTorchConfig(backend=backend, init_method=init_method)
    loopback._LoopbackTorchBackend().on_start(group, config)
    assert ray_on_start == [config]
    assert group.calls in ([], ["get_node_ip_address"])  # nothing of the loopback path ran


def test_store_listens_on_loopback_only_and_serves_clients():
    """Rank 0's store adopts a socket bound to 127.0.0.1 (Ray's env:// store listens on "::"); a client of
    rank 1 reaches it through the same handler."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"loopback://127.0.0.1:{port}?rank={{}}&world_size=2"
    with ThreadPoolExecutor(1) as pool:  # rank 0's store waits for rank 1 to connect
        rank1 = pool.submit(lambda: next(loopback._loopback_rendezvous(url.format(1), timeout=timedelta(seconds=30))))
        server, rank, world_size = next(loopback._loopback_rendezvous(url.format(0), timeout=timedelta(seconds=30)))
        client = rank1.result()[0]
    assert (rank, world_size) == (0, 2)
    listening = [c.laddr for c in psutil.Process().net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert [(a.ip, a.port) for a in listening if a.port == port] == [("127.0.0.1", port)], listening
    client.set("key", "value")
    assert server.get("key") == b"value"
    del client, server
