"""This node's own Kubernetes object: its labels, read once at start, only when needed.

The ``node.kubernetes.io/instance-type`` label tells the estimation model which hardware a
cloud VM runs on when /proc/cpuinfo does not (kwatt.sources.model, with
``kubernetes.read_node``); ``embodied.by_node_labels`` picks this node type's embodied
carbon by its labels. One GET serves both. It needs ``get`` on nodes (chart values
``config.kubernetes.read_node`` or ``rbac.readNode``); a failed read is a counted fault and
both fall back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kwatt.faults import Fault
from kwatt.text import clean_text

INSTANCE_TYPE_LABELS = ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type")
READ_TIMEOUT_SECONDS = 5.0


def read_node_labels(api_client: Any, node_name: str, timeout: float = READ_TIMEOUT_SECONDS
                     ) -> tuple[dict[str, str] | None, Fault | None]:
    """This node's labels (names and values cleaned of undecodable text), or the fault
    that prevented reading them."""
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
    return {clean_text(str(k)): clean_text(v) for k, v in labels.items()
            if isinstance(v, str)}, None


def instance_type_of(labels: Mapping[str, str]) -> str | None:
    for key in INSTANCE_TYPE_LABELS:
        value = labels.get(key)
        if value:
            return value
    return None


def node_instance_type(api_client: Any, node_name: str,
                       timeout: float = READ_TIMEOUT_SECONDS) -> tuple[str | None, Fault | None]:
    """The node's instance-type label (None when it has none), or the fault that
    prevented reading it."""
    labels, fault = read_node_labels(api_client, node_name, timeout)
    return (None, fault) if labels is None else (instance_type_of(labels), None)
