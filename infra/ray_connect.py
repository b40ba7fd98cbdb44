"""The one way a job starts or attaches to Ray: the configured cluster, else the one
``$RAY_ADDRESS`` names (the head of ``wildface services up``: ``services env`` exports it),
else a private local Ray in this process, bound to 127.0.0.1.

Ray is imported inside :func:`start_or_attach` only (infra imports no Ray at module level);
:func:`init_kwargs` decides without Ray.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from infra.config import RayStartConfig

LOOPBACK = "127.0.0.1"


def init_kwargs(rc: RayStartConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``ray.init`` arguments: ``{"address": ...}`` to attach (``rc.address``, else
    ``$RAY_ADDRESS``), else a private local Ray on loopback (``address="local"``: Ray would
    otherwise join the last cluster started on this machine) with ``rc.num_cpus`` and the
    dashboard only when ``rc.include_dashboard``."""
    env = os.environ if environ is None else environ
    address = rc.address or env.get("RAY_ADDRESS") or None
    if address:
        return {"address": address}
    return {"address": "local", "num_cpus": rc.num_cpus,
            "include_dashboard": rc.include_dashboard, "dashboard_host": LOOPBACK,
            "dashboard_port": rc.dashboard_port}


def is_loopback(address: str) -> bool:
    """``address`` ('host:port', 'ray://host:port', 'local') is on this machine's loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return address == "local" or host == "localhost" or host.startswith("127.")


def start_or_attach(rc: RayStartConfig, **options: Any) -> bool:
    """Connect this process to Ray as :func:`init_kwargs` decides; ``options`` (e.g.
    ``runtime_env``, ``log_to_driver``) go to ``ray.init`` either way. False when this
    process was already connected (nothing done), True when this call connected it (the
    caller disconnects with ``ray.shutdown()``; an attached cluster keeps running)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = init_kwargs(rc)
    if is_loopback(kwargs["address"]):
        # Ray reads the offline settings' RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 once, when it
        # is first imported; imported earlier (a caller's script, a test session), it takes
        # the machine's address as the node IP: a private Ray's daemons and workers would
        # listen on every interface, and "127.0.0.1:port" would be dialled at the machine's
        # address, where a loopback head does not answer. Ray looks this flag up at each
        # node-IP lookup (`_node_ip_address="127.0.0.1"` is turned back into the machine's
        # address by that same lookup).
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(**kwargs, **options)
    return True
