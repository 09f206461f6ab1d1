"""The node's zone from one of its labels: a read-only GET of this node's object.

RBAC: ``get`` on ``nodes`` (chart value ``rbac.readNode``). Called on a signal poller's
thread, never on the sampler's; a failure is a ``FetchError`` the poller counts and retries
with its backoff.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kwatt.signals.fetch import FetchError
from kwatt.text import clean_text
from kwatt.workloads.podwatch import ApiRequests

MAX_NODE_BYTES = 4 * 1024 * 1024


class NodeLabelZone:
    """``known_labels``: the node's labels as read at start (kwatt.workloads.node); when the
    zone label is among them no request is made, otherwise the node is read again."""

    def __init__(self, api_client: Any, node_name: str, label: str,
                 timeout_seconds: float, known_labels: Mapping[str, str] | None = None
                 ) -> None:
        self._known = known_labels
        self._api = ApiRequests(api_client)
        self._node = node_name
        self._label = label
        self._timeout = timeout_seconds

    def __call__(self) -> str:
        import json

        from kubernetes.client.exceptions import ApiException

        if self._known is not None and self._known.get(self._label):
            return self._known[self._label]
        try:
            response = self._api.get(f"/api/v1/nodes/{quote(self._node, safe='')}", {},
                                     (self._timeout, self._timeout))
            try:
                raw = response.read(MAX_NODE_BYTES + 1)
            finally:
                response.release_conn()
        except ApiException as exc:
            reason = "permission" if exc.status in (401, 403) else "api"
            raise FetchError(reason, f"node {self._node}: HTTP {exc.status}") from None
        except Exception as exc:  # urllib3 timeouts and connection errors
            raise FetchError("api", f"node {self._node}: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
        if len(raw) > MAX_NODE_BYTES:
            raise FetchError("parse", f"node {self._node}: object over {MAX_NODE_BYTES} bytes")
        try:
            labels = json.loads(raw)["metadata"].get("labels") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FetchError("parse", f"node {self._node}: not a node object") from None
        zone = labels.get(self._label) if isinstance(labels, dict) else None
        if not isinstance(zone, str) or not zone:
            raise FetchError("absent", f"node {self._node} has no label {self._label}")
        return clean_text(zone)
