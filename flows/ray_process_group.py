"""Ray Train's torch process group with its rendezvous store on the node's address only.

Ray Train's own setup (``TorchConfig``, Ray 2.60) has every worker call
``init_process_group("env://")`` with ``MASTER_ADDR`` = rank 0's node IP; rank 0's torch
``TCPStore`` server then listens on every interface (``::``), whatever ``MASTER_ADDR`` says,
so anyone who can reach the machine can talk to the store for the whole run. Here rank 0
binds a socket to its node IP (127.0.0.1 for a local Ray, the cluster address on a cluster)
and hands it to the store (``master_listen_fd``); every rank joins the process group through
that store. Gloo's own connections go over the interface that holds the rank's node IP
(``GLOO_SOCKET_IFNAME``, unless set): by default gloo binds what the host name resolves to,
often 127.0.0.1 (``/etc/hosts``), which ranks on other nodes cannot reach. Everything else
is Ray's setup (backend, worker environment, shutdown).

Imported by name in Ray's controller and workers (the config is pickled), so it lives in a
module of its own and not in a flow file.
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _TorchBackend

# Rank 0's listening socket, kept open for the worker process's life: the store serves it.
_listener: socket.socket | None = None


def _listen_on_node_ip() -> tuple[str, int]:
    """(node IP, port) of a socket that rank 0's process listens on, bound to that IP."""
    global _listener
    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen()
    _listener = sock
    return addr, sock.getsockname()[1]


def interface_of(addr: str) -> str | None:
    """The network interface whose (IPv4) address is ``addr``; None when none is."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == addr:
                return name
    return None


def _join_process_group(backend: str, world_rank: int, world_size: int, addr: str, port: int,
                        timeout_s: int) -> None:
    """This rank's store (rank 0 serves the socket of :func:`_listen_on_node_ip`) and its
    membership of the default process group."""
    timeout = timedelta(seconds=timeout_s)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        iface = interface_of(ray.util.get_node_ip_address())
        if iface:
            os.environ["GLOO_SOCKET_IFNAME"] = iface
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # As Ray does: a timed-out collective fails the worker instead of hanging it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if world_rank == 0:
        store = dist.TCPStore(addr, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=_listener.fileno())
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


class _NodeStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: NodeStoreTorchConfig) -> None:
        addr, port = worker_group.execute_single(0, _listen_on_node_ip)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            rank, _join_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=n, addr=addr, port=port, timeout_s=backend_config.timeout_s)
            for rank in range(n)])


@dataclass
class NodeStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose process-group store listens on rank 0's node IP only.
    ``backend``: "gloo" or "nccl" (required here)."""

    backend: str = "gloo"

    @property
    def backend_cls(self):
        return _NodeStoreBackend
