"""Device ids of the AMD GPU device plugin (ROCm/k8s-device-plugin), as the kubelet's
PodResources API reports them, turned into keys kwatt knows a GPU or partition by.

The plugin names a whole GPU by its PCI address, the basename of
``/sys/module/amdgpu/drivers/pci:amdgpu/<domain:bus:device.function>`` (e.g.
``0000:c1:00.0``); on MI300 GPUs split into compute partitions the first partition keeps
that id and the others are named after their platform device, ``amdgpu_xcp_<N>``
(``/sys/devices/platform/amdgpu_xcp_<N>``), whose ``drm/renderD<M>`` render node is how
amdsmi knows the partition (``drm_render``). Partitioned GPUs are offered as
``amd.com/<compute>_<memory>`` resources (``cpx_nps1``, ...), whole ones as ``amd.com/gpu``
(internal/pkg/amdgpu/amdgpu.go ``GetAMDGPUs`` and internal/pkg/plugin/plugin.go).
"""

from __future__ import annotations

import os
import re

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
XCP_DEVICE = re.compile(r"^amdgpu_xcp_\d+$")
_RENDER = re.compile(r"^renderD(\d+)$")


def amd_device_keys(device_id: str, sysfs: str) -> tuple[str, ...]:
    """The keys (PCI address, ``renderD<M>``) a device id of the AMD device plugin stands
    for; empty when it is not one (or its partition's render node cannot be read)."""
    text = device_id.strip().lower()
    if PCI_ADDRESS.match(text):
        return (text,)
    if XCP_DEVICE.match(text) and sysfs:
        try:
            names = os.listdir(os.path.join(sysfs, "devices", "platform", text, "drm"))
        except OSError:
            return ()
        return tuple(sorted(f"renderD{m.group(1)}" for n in names if (m := _RENDER.match(n))))
    return ()
