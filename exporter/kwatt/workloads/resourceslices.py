"""Which GPU a DRA device is: this node's ResourceSlices (resource.k8s.io/v1), list+watch.

The kubelet's PodResources answer names a DRA-allocated device only by (driver, pool,
device), e.g. (``gpu.nvidia.com``, ``node-a``, ``gpu-0``). The driver that published the
device says what it is in the device's attributes. NVIDIA's DRA driver
(NVIDIA/k8s-dra-driver-gpu, cmd/gpu-kubelet-plugin/deviceinfo.go) publishes on every device
``type`` (``gpu`` or ``mig``) and ``uuid`` (NVML's ``GPU-...`` or ``MIG-...``), and on MIG
devices also ``parentUUID`` (the physical GPU) and ``profile``. With its DynamicMIG feature
gate, MIG devices are abstract until a claim is prepared and carry no ``uuid``
(kubernetes-sigs/dra-driver-nvidia-gpu, where the driver now lives:
cmd/gpu-kubelet-plugin/partitions.go and ``CommonAttributesMig``); the GPU stage then
matches them to an NVML instance by parent and profile where that is unambiguous.
Attributes are read both unqualified and qualified with the driver's domain
(``gpu.nvidia.com/uuid``), as the API allows either.

Only the newest generation of each pool counts: a driver that republishes a pool bumps
``spec.pool.generation`` and slices of older generations are stale until deleted.

RBAC: ``list`` and ``watch`` on ``resource.k8s.io/resourceslices`` (the chart grants it when
``rbac.resourceSlices`` is true). Faults are counted under source ``resourceslices``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kwatt.text import clean_text
from kwatt.workloads.podwatch import ListWatcher

log = logging.getLogger("kwatt.kubernetes")

SOURCE = "resourceslices"
# Newest first. Before Kubernetes 1.34 only beta versions are served (v1beta2 has v1's
# layout; v1beta1 wraps attributes in "basic"); an API that serves none has no DRA at all.
API_VERSIONS = ("v1", "v1beta2", "v1beta1")
PATH = f"/apis/resource.k8s.io/{API_VERSIONS[0]}/resourceslices"


@dataclass(frozen=True)
class DraDevice:
    """What a published DRA device is, as far as GPUs go."""

    driver: str
    pool: str
    name: str
    uuid: str  # GPU-... or MIG-...; empty when the driver publishes none
    kind: str  # "gpu", "mig" or whatever else the driver says
    parent_uuid: str = ""
    profile: str = ""  # MIG profile, e.g. 3g.20gb


def _attribute(attributes: Mapping[str, Any], driver: str, name: str) -> str:
    for key in (name, f"{driver}/{name}"):
        value = attributes.get(key)
        if isinstance(value, Mapping):
            for typed in ("string", "version"):
                text = value.get(typed)
                if isinstance(text, str):
                    return clean_text(text)
    return ""


def slice_devices(obj: Mapping[str, Any]) -> tuple[str, int, tuple[DraDevice, ...]] | None:
    """(pool key, generation, devices) of one ResourceSlice; None when it is malformed."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return None
    driver = spec.get("driver")
    pool = spec.get("pool")
    if not isinstance(driver, str) or not isinstance(pool, Mapping):
        return None
    pool_name = pool.get("name")
    generation = pool.get("generation", 0)
    if not isinstance(pool_name, str) or not isinstance(generation, int):
        return None
    driver, pool_name = clean_text(driver), clean_text(pool_name)
    devices: list[DraDevice] = []
    for device in spec.get("devices") or ():
        if not isinstance(device, Mapping) or not isinstance(device.get("name"), str):
            continue
        # v1 and v1beta2 carry attributes on the device; v1beta1 under "basic".
        attributes = device.get("attributes")
        if not isinstance(attributes, Mapping):
            basic = device.get("basic")
            attributes = basic.get("attributes") if isinstance(basic, Mapping) else None
        if not isinstance(attributes, Mapping):
            attributes = {}
        devices.append(DraDevice(
            driver, pool_name, clean_text(device["name"]),
            _attribute(attributes, driver, "uuid"), _attribute(attributes, driver, "type"),
            _attribute(attributes, driver, "parentUUID"),
            _attribute(attributes, driver, "profile")))
    return f"{driver}\x00{pool_name}", generation, tuple(devices)


class SliceStore:
    """The node's published DRA devices by (driver, pool, device). Written by the watcher
    thread, read by the sampler: lookups see one whole table, swapped under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # slice name -> (pool key, generation, devices)
        self._slices: dict[str, tuple[str, int, tuple[DraDevice, ...]]] = {}
        self._table: dict[tuple[str, str, str], DraDevice] = {}

    def replace_all(self, slices: Mapping[str, Mapping[str, Any]]) -> None:
        parsed = {name: p for name, obj in slices.items()
                  if (p := slice_devices(obj)) is not None}
        with self._lock:
            self._slices = parsed
            self._rebuild()

    def upsert(self, name: str, obj: Mapping[str, Any]) -> None:
        parsed = slice_devices(obj)
        with self._lock:
            if parsed is None:
                self._slices.pop(name, None)
            else:
                self._slices[name] = parsed
            self._rebuild()

    def delete(self, name: str) -> None:
        with self._lock:
            self._slices.pop(name, None)
            self._rebuild()

    def _rebuild(self) -> None:
        newest: dict[str, int] = {}
        for pool, generation, _ in self._slices.values():
            newest[pool] = max(newest.get(pool, generation), generation)
        table: dict[tuple[str, str, str], DraDevice] = {}
        for pool, generation, devices in self._slices.values():
            if generation == newest[pool]:
                for device in devices:
                    table[(device.driver, device.pool, device.name)] = device
        self._table = table

    def lookup(self, driver: str, pool: str, device: str) -> DraDevice | None:
        with self._lock:
            return self._table.get((driver, pool, device))

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)


def _slice_name(obj: Mapping[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return name if isinstance(name, str) else None


class ResourceSliceWatcher(ListWatcher):
    """This node's ResourceSlices (fieldSelector ``spec.nodeName``), kept in a SliceStore.
    Slices published for all nodes or by node selector are not this node's GPUs."""

    path = PATH
    source = SOURCE
    what = "resourceslices"

    def __init__(self, api_client: Any, node_name: str, store: SliceStore,
                 **kwargs: Any) -> None:
        super().__init__(api_client, node_name, **kwargs)
        self.store = store
        self.api_version = API_VERSIONS[0]
        # False once the API server answered 404 for every version: it has no DRA, so
        # there is nothing to watch and the source is reported up.
        self.served = True

    def _list(self, consistent: bool) -> str:
        from kubernetes.client.exceptions import ApiException

        while True:
            try:
                return super()._list(consistent)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                position = API_VERSIONS.index(self.api_version) + 1
                if position == len(API_VERSIONS):
                    self.served = False
                    log.info("the API server serves no ResourceSlices (no DRA); not "
                             "watching them", extra={"source": SOURCE,
                                                     "versions": ",".join(API_VERSIONS)})
                    self.stop()
                    raise
                self.api_version = API_VERSIONS[position]
                self.path = f"/apis/resource.k8s.io/{self.api_version}/resourceslices"

    def _replace(self, items: list[Mapping[str, Any]]) -> None:
        self.store.replace_all({name: item for item in items
                                if (name := _slice_name(item)) is not None})

    def _apply_one(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = _slice_name(obj)
        if name is None:
            return
        if kind == "DELETED":
            self.store.delete(name)
        else:
            self.store.upsert(name, obj)
