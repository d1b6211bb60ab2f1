"""The pure parts of the bus sources: line parsing, register decoding and read planning, IIO scan
layouts, and the config checks that span a source's fields."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgeagent.core import config as cfgmod
from edgeagent.core.config import ConfigError
from edgeagent.sensors.iio import ScanType, decode_scan, find_device, scan_layout
from edgeagent.sensors.modbus import decode, plan_reads
from edgeagent.sensors.serial import parse_line
from edgeagent.sensors.status import Channel, SourceStatus


@pytest.mark.parametrize(("line", "fmt", "expected"), [
    ("1,2.5,-3", "csv", [1.0, 2.5, -3.0]),
    ("ax=1 ay=2.5 az=-3", "kv", [1.0, 2.5, -3.0]),
    ("az=-3;ay=2.5,ax=1 extra=7", "kv", [1.0, 2.5, -3.0]),
])
def test_parse_line(line: str, fmt: str, expected: list[float]) -> None:
    assert parse_line(line, fmt, ["ax", "ay", "az"], ",") == expected


@pytest.mark.parametrize(("line", "fmt", "why"), [
    ("1,2", "csv", "expected 3 columns"),
    ("1,x,3", "csv", "not a number"),
    ("ax=1 ay=2", "kv", "missing key 'az'"),
    ("ax=1 ay 2", "kv", "key=value"),
])
def test_parse_line_malformed(line: str, fmt: str, why: str) -> None:
    out = parse_line(line, fmt, ["ax", "ay", "az"], ",")
    assert isinstance(out, str) and why in out


def _words(fmt: str, value: float) -> list[int]:
    raw = struct.pack(fmt, value)
    return [int.from_bytes(raw[i:i + 2], "big") for i in range(0, len(raw), 2)]


@pytest.mark.parametrize(("type_", "fmt", "value"), [
    ("int16", ">h", -123), ("uint16", ">H", 65000), ("int32", ">i", -70000),
    ("uint32", ">I", 4_000_000_000), ("float32", ">f", 21.5),
])
def test_decode_types_and_word_order(type_: str, fmt: str, value: float) -> None:
    words = _words(fmt, value)
    assert decode(words, type_, "big") == pytest.approx(value)
    assert decode(list(reversed(words)), type_, "little") == pytest.approx(value)


def test_plan_reads_groups_neighbours_per_table() -> None:
    cfg = cfgmod.build({"sensors": {"source": "modbus", "modbus": {"registers": [
        {"name": "a", "address": 0, "type": "int16"},
        {"name": "b", "address": 1, "type": "float32"},
        {"name": "c", "address": 40, "type": "uint16"},
        {"name": "d", "table": "input", "address": 3},
    ]}}}, env={})
    blocks = plan_reads(cfg.sensors.modbus.registers)
    assert [(b.table, b.start, b.count, b.members) for b in blocks] == [
        ("holding", 0, 3, ((0, 0), (1, 1))), ("holding", 40, 1, ((2, 0),)), ("input", 3, 1, ((3, 0),))]


@pytest.mark.parametrize(("text", "expected"), [
    ("le:s13/16>>0", ScanType(False, True, 13, 16, 0)),
    ("be:u12/16>>4", ScanType(True, False, 12, 16, 4)),
    ("le:s64/64>>0", ScanType(False, True, 64, 64, 0)),
])
def test_scan_type(text: str, expected: ScanType) -> None:
    assert ScanType.parse(text) == expected


@pytest.mark.parametrize("text", ["le:s13/12>>0", "xx:s13/16>>0", "le:s12/16X2>>0", "le:s24/24>>0"])
def test_scan_type_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        ScanType.parse(text)


def test_scan_layout_aligns_like_the_kernel() -> None:
    s16, s64 = ScanType.parse("le:s13/16>>0"), ScanType.parse("le:s64/64>>0")
    size, offsets = scan_layout([(0, "x", s16), (1, "y", s16), (2, "z", s16), (3, "ts", s64)])
    assert size == 16 and offsets == {"x": 0, "y": 2, "z": 4, "ts": 8}
    size, offsets = scan_layout([(0, "x", s16)])
    assert size == 2 and offsets == {"x": 0}


def test_decode_scan_shift_and_sign() -> None:
    st = ScanType.parse("be:s12/16>>4")
    data = b"".join(struct.pack(">H", ((v & 0xFFF) << 4) | 0xF) for v in (5, -5, 2047, -2048))
    assert decode_scan(data, 2, 0, st).tolist() == [5, -5, 2047, -2048]


def test_find_device_by_name_and_alone(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    from edgeagent.core.errors import SensorError
    root = Path(str(tmp_path))
    for i, name in enumerate(("adxl345", "ads1015")):
        (root / f"iio:device{i}").mkdir()
        (root / f"iio:device{i}" / "name").write_text(name + "\n")
    assert find_device(root, "ads1015").name == "iio:device1"
    assert find_device(root, "iio:device0").name == "iio:device0"
    with pytest.raises(SensorError, match=r"set sensors\.iio\.device"):
        find_device(root, "")
    with pytest.raises(SensorError, match="found: adxl345, ads1015"):
        find_device(root, "bmi160")


def test_status_drops_out_of_range_rows_and_selects() -> None:
    st = SourceStatus("serial", "x", [Channel("a", "g", -1, 1), Channel("b", "g")], ["b"])
    out = st.accept(1.0, np.array([[0.5, 7.0], [2.0, 8.0], [np.nan, 1.0]]))
    assert out is not None and out.tolist() == [[7.0]]
    assert st.out_of_range == 2 and st.samples == 1
    assert st.section()["channels"] == {"a": {"value": 0.5, "unit": "g"}, "b": {"value": 7.0, "unit": "g"}}


def test_down_reports_once_and_backs_off() -> None:
    events: list[tuple[str, str, str, dict[str, object]]] = []
    st = SourceStatus("modbus", "h:502", [Channel("t")], retry_initial_s=1.0, retry_max_s=4.0)
    st.events = lambda *e: events.append(e)
    delays = [st.down("refused") for _ in range(5)]
    assert len(events) == 1 and events[0][:2] == ("sensor", "warning") and st.disconnects == 1
    assert 0.8 <= delays[0] <= 1.0 and 3.2 <= delays[-1] <= 4.0
    st.up()
    st.up()
    assert [e[1] for e in events] == ["warning", "info"] and st.state == "ok"


@pytest.mark.parametrize(("sensors", "error"), [
    ({"source": "serial", "select": ["ax", "nope"]}, "sensors.select[1]: 'nope' is not a channel"),
    ({"source": "serial", "limits": {"ax": [1.0, -1.0]}}, "sensors.limits.ax: expected [min, max]"),
    ({"source": "serial", "serial": {"columns": ["a", "a"]}}, "duplicate channel names a"),
    ({"source": "modbus"}, "sensors.modbus.registers: the modbus source needs at least one channel"),
    ({"source": "modbus", "modbus": {"registers": [{"address": 1}]}}, "registers[0].name: required key"),
    ({"source": "modbus", "modbus": {"registers": [{"name": "t", "type": "int64"}]}}, "registers[0].type"),
    ({"source": "serial", "serial": {"stopbits": 3}}, "sensors.serial.stopbits: expected 1, 1.5 or 2"),
    ({"source": "iio", "units": {"temp": "C"}}, "sensors.units.temp: not a channel"),
    ({"source": "can"}, "sensors.source: expected one of"),
])
def test_sensor_config_errors_name_their_key(sensors: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfgmod.build({"sensors": sensors}, env={})
    assert any(error in e for e in exc.value.errors), exc.value.errors


def test_source_kind_from_the_environment() -> None:
    raw = {"sensors": {"source": "${EDGEAGENT_SENSOR_SOURCE:-iio}"}}
    assert cfgmod.build(raw, env={}).sensors.source == "iio"
    assert cfgmod.build(raw, env={"EDGEAGENT_SENSOR_SOURCE": "simulated"}).sensors.source == "simulated"
