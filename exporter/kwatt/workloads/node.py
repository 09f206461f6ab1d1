"""This node's own Kubernetes object: read once at start, only when the chart allows it.

The node's ``node.kubernetes.io/instance-type`` label tells the estimation model which
hardware a cloud VM runs on when /proc/cpuinfo does not (kwatt.sources.model). Reading it
needs ``get`` on this one node (chart value ``config.kubernetes.read_node``), so it is off
by default; a failed read is a counted fault and the model falls back.
"""

from __future__ import annotations

from typing import Any

from kwatt.faults import Fault
from kwatt.text import clean_text

INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
READ_TIMEOUT_SECONDS = 5.0


def node_instance_type(api_client: Any, node_name: str,
                       timeout: float = READ_TIMEOUT_SECONDS) -> tuple[str | None, Fault | None]:
    """The node's instance-type label (None when it has none), or the fault that
    prevented reading it."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        node = client.CoreV1Api(api_client).read_node(node_name, _request_timeout=timeout)
    except ApiException as exc:
        reason = {401: "permission", 403: "permission", 404: "absent"}.get(
            int(exc.status or 0), "api")
        return None, Fault("kubernetes", reason, f"node {node_name}",
                           f"GET node: HTTP {exc.status} {exc.reason}")
    except (HTTPError, OSError) as exc:
        return None, Fault("kubernetes", "api", f"node {node_name}",
                           f"GET node: {type(exc).__name__}")
    labels = (node.metadata.labels if node.metadata is not None else None) or {}
    for key in INSTANCE_TYPE_LABELS:
        value = labels.get(key)
        if isinstance(value, str) and value:
            return clean_text(value), None
    return None, None
