"""Which checks run, in which order: the config first (nothing else is meaningful without it), then
the static checks, then (unless `static`) the deep ones, cheapest first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edgeagent.check.files import User, static_checks
from edgeagent.check.result import Check, fail, info, ok
from edgeagent.core.config import Config
from edgeagent.core.errors import ConfigError


def load_for_check(path: Path) -> tuple[Config | None, list[Check]]:
    """The config the agent would run (the file plus an applied remote layer), or None and one FAIL
    per error in the file."""
    from edgeagent.core.config_layers import load_effective

    try:
        effective = load_effective(path)
    except ConfigError as exc:
        where = exc.source or str(path)
        fix = "edit the file; `edgeagent check-config` lists the same"
        return None, [fail("config", f"{where}: {e}", fix) for e in exc.errors]
    checks = [ok("config", f"{path} is valid")]
    if effective.remote:
        checks.append(info("config.remote", "a signed remote config layer is applied on top of the file "
                                            "(edgeagent config diff shows it)"))
    return effective.config, checks


def run_checks(cfg: Config, user: User, *, static: bool = False, timeout_s: float = 5.0) -> list[Check]:
    checks = [info("user", f"file access judged for {user.name} (uid {user.uid})")]
    checks += _guarded("files", lambda: static_checks(cfg, user, lenient=static))
    if static:
        return checks
    from edgeagent.check.broker import broker_checks, negotiated_protocol
    from edgeagent.check.model import model_checks
    from edgeagent.check.sources import source_checks
    from edgeagent.check.system import system_checks

    checks += _guarded("inference", lambda: model_checks(cfg))
    checks += _guarded("sensors", lambda: source_checks(cfg, timeout_s))
    checks += _guarded("mqtt", lambda: broker_checks(cfg, timeout_s))
    protocol = negotiated_protocol(cfg.state_dir)
    if protocol is not None:
        checks.append(protocol)
    checks += _guarded("systemd", lambda: system_checks(cfg))
    return checks


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """A file system or device surprise in one group is that group's FAIL line, not the end of the check."""
    try:
        return run()
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return [fail(name, f"{where}{exc.strerror or exc}", "see the lines above; else report this")]
