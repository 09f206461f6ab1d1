"""The IPMI DCMI meter through the real python-ipmi library.

A fake python-ipmi *interface* (the layer that would talk to /dev/ipmi0) answers with the
bytes of a DCMI Get Power Reading response as the DCMI specification lays them out, so the
library's own encoding and decoding run; the device path itself is exercised with a
missing device and a regular file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pyipmi
import pytest
from conftest import FakeClock
from kwatt.config import ConfigError, load_config
from kwatt.sources.ipmi import IpmiDcmiMeter, IpmiSettings, build_ipmi_meter
from pyipmi.errors import IpmiTimeoutError
from pyipmi.interfaces.base import Interface

NETFN_GROUP_EXTENSION = 0x2C
CMD_GET_POWER_READING = 0x02
DCMI = 0xDC


class FakeBmcInterface(Interface):
    """Answers DCMI Get Power Reading; ``mode`` switches to failures."""

    NAME = "kwatt-test"

    def __init__(self) -> None:
        self.mode = "ok"
        self.watts = 412
        self.state = 0x40  # power measurement active
        self.requests: list[tuple[int, bytes]] = []

    def is_system_interface(self, target: Any) -> bool:
        return True

    def send_and_receive_raw(self, target: Any, lun: int, netfn: int,
                             raw_bytes: bytes) -> bytes:
        self.requests.append((netfn, bytes(raw_bytes)))
        if self.mode == "timeout":
            raise IpmiTimeoutError()
        if self.mode == "invalid-command":
            return bytes([0xC1])
        if self.mode == "device-gone":
            raise OSError(19, "No such device")  # ENODEV
        body = struct.pack("<BBHHHHIIB", 0x00, DCMI, self.watts, 90, 950, 400,
                           1_700_000_000, 1000, self.state)
        if self.mode == "truncated":
            return body[:5]
        return body


def connection_to(interface: FakeBmcInterface) -> Any:
    connection = pyipmi.create_connection(interface)
    connection.target = pyipmi.Target(ipmb_address=0x20)
    return connection


def make_meter(interface: FakeBmcInterface, clock: FakeClock | None = None) -> IpmiDcmiMeter:
    return IpmiDcmiMeter(IpmiSettings(device="/dev/ipmi0"),
                         connect=lambda: connection_to(interface), clock=clock or FakeClock())


def test_reads_current_power_through_python_ipmi() -> None:
    interface = FakeBmcInterface()
    clock = FakeClock(50.0)
    meter = make_meter(interface, clock)
    assert meter.poll_once()
    samples, faults = meter.latest()
    assert faults == []
    assert [(s.source, s.sensor, s.watts, s.energy_joules, s.read_at, s.generation)
            for s in samples] == [("ipmi", "dcmi", 412.0, None, 50.0, 1)]
    # The request python-ipmi encoded: DCMI Get Power Reading, mode 1, no attributes.
    assert interface.requests == [(NETFN_GROUP_EXTENSION,
                                   bytes([CMD_GET_POWER_READING, DCMI, 0x01, 0x00, 0x00]))]
    interface.watts = 530
    clock.now = 60.0
    assert meter.poll_once()
    assert [(s.watts, s.read_at, s.generation) for s in meter.latest()[0]] == [
        (530.0, 60.0, 2)]


@pytest.mark.parametrize(("mode", "reason"), [
    ("timeout", "timeout"), ("invalid-command", "api"), ("device-gone", "absent"),
    ("truncated", "parse")])
def test_faults_are_counted_and_recovered(mode: str, reason: str) -> None:
    interface = FakeBmcInterface()
    meter = make_meter(interface)
    assert meter.poll_once()
    interface.mode = mode
    assert not meter.poll_once()
    samples, faults = meter.latest()
    assert [(f.source, f.reason) for f in faults] == [("ipmi", reason)]
    assert [s.generation for s in samples] == [1]  # the last good reading stays
    assert meter.consecutive_failures == 1 and meter.next_delay() >= 10.0
    interface.mode = "ok"
    assert meter.poll_once()
    assert [s.generation for s in meter.latest()[0]] == [2]
    assert meter.consecutive_failures == 0 and meter.next_delay() == 10.0


def test_inactive_measurement_and_implausible_power() -> None:
    interface = FakeBmcInterface()
    meter = make_meter(interface)
    interface.state = 0x00
    assert not meter.poll_once()
    assert [f.reason for f in meter.latest()[1]] == ["absent"]
    interface.state = 0x40
    interface.watts = 65_000
    assert not meter.poll_once()
    samples, faults = meter.latest()
    assert [f.reason for f in faults] == ["implausible"] and samples == []


def test_real_device_path_faults(tmp_path: Path) -> None:
    # python-ipmi's ipmidev interface on a missing device and on a file that is no device.
    missing = IpmiDcmiMeter(IpmiSettings(device=str(tmp_path / "ipmi0")))
    assert not missing.poll_once()
    assert [f.reason for f in missing.latest()[1]] == ["absent"]
    not_a_device = tmp_path / "file"
    not_a_device.write_text("")
    meter = IpmiDcmiMeter(IpmiSettings(device=str(not_a_device)))
    assert not meter.poll_once()
    faults = meter.latest()[1]
    assert len(faults) == 1 and faults[0].source == "ipmi"


def test_config(tmp_path: Path) -> None:
    assert build_ipmi_meter(load_config(["--node-name", "n"], env={})) is None
    missing = load_config(["--node-name", "n", "--ipmi.device", str(tmp_path / "ipmi0")],
                          env={})
    with pytest.raises(ConfigError, match=r"--ipmi.device: .*ipmi0 does not exist"):
        build_ipmi_meter(missing)
    present = tmp_path / "ipmi0"
    present.write_text("")
    meter = build_ipmi_meter(load_config(["--node-name", "n", "--ipmi.device", str(present)],
                                         env={}), start=False)
    assert meter is not None


def test_pending_faults_are_bounded_when_nobody_asks() -> None:
    from kwatt.sources.ipmi import MAX_PENDING_FAULTS
    interface = FakeBmcInterface()
    interface.mode = "timeout"
    meter = make_meter(interface)
    for _ in range(MAX_PENDING_FAULTS + 10):
        meter.poll_once()
    assert len(meter.latest()[1]) == MAX_PENDING_FAULTS
