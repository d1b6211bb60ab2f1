"""Checks of a `SensorsConfig` that span its fields (names the model selects, limits, register maps).

Pure functions over the schema, so `check-config` reports them with the key path, and a caller
holding several source configs (one per pipeline) runs them with each one's own path.
"""

from __future__ import annotations

from edgeagent.core.config_schema import SensorsConfig

BUS_SOURCES = ("serial", "modbus", "iio")


def channel_names(s: SensorsConfig) -> tuple[str, ...]:
    """The channels a bus source reads, in its order (empty for simulated/csv/mqtt)."""
    if s.source == "serial":
        return s.serial.columns
    if s.source == "modbus":
        return tuple(r.name for r in s.modbus.registers)
    if s.source == "iio":
        return s.iio.channels
    return ()


def _duplicates(names: tuple[str, ...]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def check_sensors(s: SensorsConfig, path: str = "sensors") -> list[str]:
    """Every cross-field problem of one source config, each with its key path."""
    errors: list[str] = []
    if s.retry_initial_s > s.retry_max_s:
        errors.append(f"{path}.retry_initial_s: expected at most {path}.retry_max_s")
    if s.source not in BUS_SOURCES:
        return errors
    names = channel_names(s)
    where = {"serial": f"{path}.serial.columns", "modbus": f"{path}.modbus.registers",
             "iio": f"{path}.iio.channels"}[s.source]
    if not names:
        errors.append(f"{where}: the {s.source} source needs at least one channel")
    if dups := _duplicates(names):
        errors.append(f"{where}: duplicate channel names {', '.join(dups)}")
    for i, name in enumerate(s.select):
        if name not in names:
            errors.append(f"{path}.select[{i}]: {name!r} is not a channel of the {s.source} source "
                          f"(it has {', '.join(names) or 'none'})")
    for name, lim in s.limits.items():
        if name not in names:
            errors.append(f"{path}.limits.{name}: not a channel of the {s.source} source")
        elif len(lim) != 2 or lim[0] > lim[1]:
            errors.append(f"{path}.limits.{name}: expected [min, max] with min <= max, got {list(lim)}")
    for name in s.units:
        if name not in names:
            errors.append(f"{path}.units.{name}: not a channel of the {s.source} source")
    if s.source == "modbus":
        for i, r in enumerate(s.modbus.registers):
            if r.min is not None and r.max is not None and r.min > r.max:
                errors.append(f"{path}.modbus.registers[{i}].max: expected at least min ({r.min:g})")
    return errors
