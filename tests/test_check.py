"""`edgeagent check` in real processes: a good config passes (exit 0); a missing CA file, a missing model,
a broker that refuses the credentials and an unwritable state dir each FAIL by name (exit 1); `--json`
parses; `--static` stays offline; `check-config` runs the file checks too. Real Mosquitto, real TFLite."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeagent.check.files import RELEASED, User, access_problem, clock_check, service_user
from edgeagent.check.result import Check
from edgeagent.check.sources import SOURCE_CHECKS, source_checks
from edgeagent.check.system import system_checks
from edgeagent.core import config as cfgmod
from edgeagent.core import signing
from tests.broker import Broker, TlsFiles

EDGEAGENT = [sys.executable, "-m", "edgeagent.cli"]
IS_ROOT = os.geteuid() == 0


def write_config(tmp_path: Path, port: int | None, extra: str = "", *, state: Path | None = None,
                 mqtt: str = "") -> Path:
    """A config that passes on this machine: loopback broker, shipped model, simulated sensor,
    a trusted key that exists, firmware in direct mode."""
    keys = tmp_path / "keys"
    if not (keys / "ops.pem").exists():
        keys.mkdir(exist_ok=True)
        signing.generate_keypair(keys / "ops.key", keys / "ops.pem")
    state = state or tmp_path / "state"
    host = f'host = "127.0.0.1"\nport = {port}\n' if port else 'host = ""\n'
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "chk1"\nstate_dir = "{state}"\n'
                    f'[mqtt]\n{host}{mqtt}\n[mqtt.tls]\nenabled = false\n'
                    f'[updates]\ntrusted_keys = {{ "ops" = "{keys / "ops.pem"}" }}\n'
                    '[updates.firmware]\nmode = "direct"\ninstaller = "script"\n'
                    f'commands = {{ install = ["{shutil.which("true")}", "{{artifact}}"] }}\n{extra}')
    return path


def check(config: Path, *args: str, timeout_s: float = 120) -> tuple[int, dict[str, Any], str]:
    """Run `edgeagent check --json` as a process: (exit status, the JSON, stderr)."""
    r = subprocess.run([*EDGEAGENT, "check", "--config", str(config), "--json", "--timeout", "5", *args],
                       capture_output=True, text=True, timeout=timeout_s, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout), r.stderr


def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c in doc["checks"]:
        out.setdefault(c["name"], c)
        if c["status"] == "FAIL":
            out[c["name"]] = c  # a FAIL wins over an earlier ok of the same name
    return out


def fails(doc: dict[str, Any]) -> set[str]:
    return {c["name"] for c in doc["checks"] if c["status"] == "FAIL"}


@pytest.mark.integration
def test_a_good_config_passes_with_every_deep_check(tmp_path: Path, broker: Broker) -> None:
    config = write_config(tmp_path, broker.port)
    started = time.monotonic()
    status, doc, _ = check(config)
    elapsed = time.monotonic() - started
    print(f"edgeagent check (good config, process): {elapsed:.2f}s, own figure {doc['seconds']}s")
    assert status == 0 and doc["ok"] is True and fails(doc) == set(), doc
    checks = by_name(doc)
    for name in ("config", "mqtt.host", "mqtt.port", "mqtt.login", "inference.model", "inference.runtime",
                 "sensors.window", "sensors.source", "device.state_dir", "spool.max_mb", "clock",
                 "updates.trusted_keys.ops", "updates.firmware.installer"):
        assert checks[name]["status"] == "ok", (name, checks.get(name))
    assert "MQTT 5 CONNECT accepted" in checks["mqtt.login"]["reason"]
    assert not (tmp_path / "state").exists(), "check only reads: it does not make the state dir"


@pytest.mark.integration
def test_the_text_form_is_one_line_per_check_and_a_verdict(tmp_path: Path, broker: Broker) -> None:
    config = write_config(tmp_path, broker.port)
    r = subprocess.run([*EDGEAGENT, "check", "-c", str(config)], capture_output=True, text=True, timeout=120,
                       check=False)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines[-1].startswith("check passed: ") and " 0 FAIL" in lines[-1]
    assert all(line.split()[0] in ("ok", "warn", "info") for line in lines[:-1]), r.stdout


@pytest.mark.integration
def test_a_missing_ca_file_fails_by_name(tmp_path: Path, broker: Broker) -> None:
    missing = tmp_path / "tls" / "ca.pem"
    config = write_config(tmp_path, broker.port)
    config.write_text(config.read_text().replace("[mqtt.tls]\nenabled = false",
                                                 f'[mqtt.tls]\nenabled = true\nca_file = "{missing}"'))
    status, doc, _ = check(config)
    assert status == 1 and doc["ok"] is False
    ca = by_name(doc)["mqtt.tls.ca_file"]
    assert ca["status"] == "FAIL" and str(missing) in ca["reason"] and "no such file" in ca["reason"]
    assert ca["fix"]
    # check-config names the same file, and says so with exit 1 (the config itself is valid)
    r = subprocess.run([*EDGEAGENT, "check-config", str(config)], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 1 and "FAIL  mqtt.tls.ca_file" in r.stdout and str(missing) in r.stdout
    assert "Traceback" not in r.stderr
    r = subprocess.run([*EDGEAGENT, "check-config", "--no-files", str(config)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0 and "mqtt.tls.ca_file" not in r.stdout


def test_static_as_execstartpre_writes_journal_priorities(tmp_path: Path) -> None:
    """What the unit's ExecStartPre does: offline checks, one line each, `<3>` on a FAIL so that
    `journalctl -p err -u edgeagent` shows why the service did not start."""
    missing = tmp_path / "ca.pem"
    config = write_config(tmp_path, 1)  # nothing listens on port 1: --static must not try
    config.write_text(config.read_text().replace("[mqtt.tls]\nenabled = false",
                                                 f'[mqtt.tls]\nenabled = true\nca_file = "{missing}"'))
    r = subprocess.run([*EDGEAGENT, "check", "--static", "--config", str(config)], capture_output=True,
                       text=True, timeout=60, check=False, env={**os.environ, "JOURNAL_STREAM": "8:1234"})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("<3>FAIL  mqtt.tls.ca_file") and str(missing) in line for line in lines)
    assert all(line.startswith(("<3>", "<4>", "<6>")) for line in lines[:-1]), lines
    assert "mqtt.port" not in r.stdout


@pytest.mark.integration
def test_a_missing_model_fails_by_name(tmp_path: Path, broker: Broker) -> None:
    config = write_config(tmp_path, broker.port, '[inference]\nmodel = "no-such-model"\n')
    status, doc, _ = check(config)
    assert status == 1
    model = by_name(doc)["inference.model"]
    assert model["status"] == "FAIL" and "'no-such-model'" in model["reason"] and model["fix"]
    assert fails(doc) == {"inference.model"}, doc  # nothing else is blamed for it


def test_a_store_naming_a_missing_version_fails_unless_a_shipped_model_reseeds_it(tmp_path: Path) -> None:
    from edgeagent.check.files import model_file_checks

    state = tmp_path / "state"
    for name in ("vibration-anomaly", "pushed-only"):
        (state / "models" / name).mkdir(parents=True)
        (state / "models" / name / "active.json").write_text(json.dumps({"name": name, "version": "9.9.9"}))
    shipped = cfgmod.load(write_config(tmp_path, None, state=state))
    (c,) = model_file_checks(shipped, service_user())
    assert c.status == "ok" and "shipped" in c.reason  # the store is seeded again on start
    pushed = cfgmod.load(write_config(tmp_path, None, '[inference]\nmodel = "pushed-only"\n', state=state))
    (c,) = model_file_checks(pushed, service_user())
    assert c.status == "FAIL" and "pushed-only@9.9.9" in c.reason


@pytest.mark.integration
def test_a_broker_that_refuses_the_credentials_fails_by_name(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev1", "s3cret"], check=True,
                   capture_output=True)
    b = Broker(workdir=tmp_path / "broker", password_file=pw).start()
    try:
        for protocol in ("5", "3.1.1"):
            bad = write_config(tmp_path, b.port, mqtt=f'protocol = "{protocol}"\nusername = "dev1"\n'
                                                     'password = "wrong"\n')
            status, doc, _ = check(bad)
            login = by_name(doc)["mqtt.login"]
            assert status == 1 and fails(doc) == {"mqtt.login"}, doc
            assert "refused" in login["reason"] and login["fix"], login
            good = write_config(tmp_path, b.port, mqtt=f'protocol = "{protocol}"\nusername = "dev1"\n'
                                                      'password = "s3cret"\n')
            status, doc, _ = check(good)
            assert status == 0, doc
            assert f"MQTT {protocol} CONNECT as 'dev1' accepted" in by_name(doc)["mqtt.login"]["reason"]
    finally:
        b.stop()


@pytest.mark.integration
def test_tls_handshake_and_client_certificate(tmp_path: Path) -> None:
    """Mutual TLS with generated certificates passes; a CA that did not sign the broker fails at `tls`."""
    from tests.test_transport_tls import make_certs

    ours = make_certs(tmp_path / "ours", "chk1")
    foreign = make_certs(tmp_path / "foreign", "chk1")
    b = Broker(workdir=tmp_path / "broker", tls=TlsFiles(ours / "ca.crt", ours / "server.crt",
                                                          ours / "server.key")).start()
    try:
        for pki, want in ((ours, "ok"), (foreign, "FAIL")):
            config = write_config(tmp_path, b.port)
            tls = (f'[mqtt.tls]\nenabled = true\nca_file = "{pki / "ca.crt"}"\n'
                   f'cert_file = "{ours / "clients/chk1.crt"}"\nkey_file = "{ours / "clients/chk1.key"}"')
            config.write_text(config.read_text().replace("[mqtt.tls]\nenabled = false", tls))
            status, doc, _ = check(config)
            checks = by_name(doc)
            assert checks["mqtt.tls"]["status"] == want, doc
            if want == "ok":
                assert status == 0 and "client certificate" in checks["mqtt.login"]["reason"], doc
            else:
                assert status == 1 and fails(doc) == {"mqtt.tls"}
                assert "self-signed certificate in certificate chain" in checks["mqtt.tls"]["reason"]
    finally:
        b.stop()


@pytest.mark.integration
def test_an_unreachable_broker_fails_at_the_port_and_static_stays_offline(tmp_path: Path) -> None:
    from tests.util import free_port

    config = write_config(tmp_path, free_port())
    status, doc, _ = check(config)
    assert status == 1 and fails(doc) == {"mqtt.port"}
    status, doc, _ = check(config, "--static")
    assert status == 0, doc
    names = {c["name"] for c in doc["checks"]}
    assert not names & {"mqtt.host", "mqtt.port", "mqtt.login", "inference.runtime", "sensors.source"}
    assert {"config", "device.state_dir", "clock", "inference.model"} <= names


def _under_a_file(tmp_path: Path) -> Iterator[Path]:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state dir's parent should be\n")
    yield blocker / "state"


def _immutable(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "immutable-state"
    state.mkdir()
    if not IS_ROOT or subprocess.run(["chattr", "+i", str(state)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root and a file system that supports it")
    try:
        yield state
    finally:
        subprocess.run(["chattr", "-i", str(state)], check=False)


@pytest.mark.integration
@pytest.mark.parametrize("make_state", [_under_a_file, _immutable], ids=["under-a-file", "chattr+i"])
def test_an_unwritable_state_dir_fails_by_name(tmp_path: Path, broker: Broker, make_state: Any) -> None:
    """Root passes every mode check, so these really fail for root too."""
    gen = make_state(tmp_path)
    state = next(gen)
    try:
        status, doc, _ = check(write_config(tmp_path, broker.port, state=state))
        sd = by_name(doc)["device.state_dir"]
        assert status == 1 and sd["status"] == "FAIL" and str(state) in sd["reason"], doc
        assert fails(doc) == {"device.state_dir"}, doc
    finally:
        gen.close()


@pytest.mark.integration
def test_the_negotiated_protocol_is_shown(tmp_path: Path, broker: Broker) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "mqtt_protocol").write_text("3.1.1\n")
    status, doc, _ = check(write_config(tmp_path, broker.port, state=state))
    proto = by_name(doc)["mqtt.protocol"]
    assert status == 0 and proto == {"name": "mqtt.protocol", "status": "info",
                                     "reason": "the agent last negotiated MQTT 3.1.1", "fix": ""}


def test_an_invalid_config_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[mqtt]\nport = 0\n[monitor]\ninterval_s = "fast"\n[typo]\nx = 1\n')
    status, doc, _ = check(config)
    assert status == 2 and doc["ok"] is False
    reasons = " ".join(c["reason"] for c in doc["checks"])
    assert "mqtt.port" in reasons and "monitor.interval_s" in reasons and "typo" in reasons


# --------------------------------------------------------------------------- the pieces, in-process


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path sits below a 0700 directory)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="edgeagent-check-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_access_is_judged_for_the_service_user_not_for_root(tmp_path: Path, open_dir: Path) -> None:
    problem = access_problem(tmp_path / "x", service_user("nobody"))
    assert problem is not None and "no such file" in problem
    (tmp_path / "x").write_text("")
    problem = access_problem(tmp_path / "x", service_user("nobody"))
    assert problem is not None and "nobody cannot enter" in problem  # pytest's 0700 parent
    tmp_path = open_dir
    secret = tmp_path / "client.key"
    secret.write_text("key")
    secret.chmod(0o600)
    nobody = service_user("nobody")
    assert nobody.uid != os.geteuid()
    problem = access_problem(secret, nobody)
    assert problem is not None and "not readable by nobody" in problem and "-rw-------" in problem
    secret.chmod(0o640)
    group_member = User("member", 54321, frozenset({secret.stat().st_gid}))
    assert access_problem(secret, group_member) is None
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    (hidden / "ca.pem").write_text("x")
    (hidden / "ca.pem").chmod(0o644)
    problem = access_problem(hidden / "ca.pem", nobody)
    assert problem is not None and f"cannot enter {hidden}" in problem


def test_a_clock_before_the_release_fails() -> None:
    assert clock_check(RELEASED.timestamp() - 86400).status == "FAIL"
    assert clock_check(RELEASED.timestamp() + 86400).status == "ok"
    assert clock_check(RELEASED.timestamp() - 86400, lenient=True).status == "warn"  # ExecStartPre


def test_source_kinds_are_a_table_and_an_unknown_kind_warns(tmp_path: Path, broker: Broker) -> None:
    assert set(SOURCE_CHECKS) >= {"simulated", "csv", "mqtt", "serial", "modbus", "iio"}
    csv = write_config(tmp_path, None,
                       f'[sensors]\nsource = "csv"\n[sensors.csv]\npath = "{tmp_path / "x.csv"}"\n')
    (c,) = source_checks(cfgmod.load(csv), 5.0)
    assert c.status == "FAIL" and "x.csv" in c.reason
    mqtt = write_config(tmp_path, None, f'[sensors]\nsource = "mqtt"\n[sensors.mqtt]\nport = {broker.port}\n')
    checks = source_checks(cfgmod.load(mqtt), 5.0)
    assert [c.status for c in checks] == ["ok", "ok", "ok"]
    assert "subscribed to sensors/vibration" in checks[-1].reason

    odd = dataclasses.replace(cfgmod.load(csv).sensors, source="can")  # type: ignore[arg-type]
    (c,) = source_checks(cfgmod.load(csv), 5.0, [("sources.bus", odd)])  # a kind with no check
    assert c.status == "warn" and "can" in c.reason


def test_the_installer_helper_is_required_where_configured(tmp_path: Path) -> None:
    cfg = cfgmod.load(write_config(tmp_path, None))
    privileged_cfg = cfgmod.build({**cfgmod.read_toml(write_config(tmp_path, None)),
                                   "updates": {"firmware": {"mode": "privileged"}}})
    units = tmp_path / "units"
    units.mkdir()
    on_board = {c.name: c for c in system_checks(privileged_cfg, (units,), systemd=True)}
    assert on_board["systemd"].status == "warn"
    assert on_board["updates.firmware.mode"].status == "FAIL"
    for unit in ("edgeagent.service", "edgeagent-installer.path"):
        (units / unit).write_text("[Unit]\n")
    installed = {c.name: c for c in system_checks(privileged_cfg, (units,), systemd=True)}
    assert installed["systemd"].status == installed["updates.firmware.mode"].status == "ok"
    direct = {c.name: c for c in system_checks(cfg, (units,), systemd=False)}
    assert direct["updates.firmware.installer"].status == "ok" and direct["systemd"].status == "ok"


def test_json_lines_are_checks() -> None:
    assert Check("x", "FAIL", "why", "fix").line().startswith("FAIL  x ")


def test_a_name_that_does_not_resolve_fails_at_the_host_step() -> None:
    from edgeagent.check.broker import Endpoint, reach

    (c,) = reach(Endpoint("no-such-host.invalid", 1883), 5.0, "mqtt")  # .invalid never resolves (RFC 2606)
    assert c.status == "FAIL" and c.name == "mqtt.host" and "does not resolve" in c.reason


def test_bus_sources_are_checked_per_kind_and_every_pipeline_is_checked(tmp_path: Path) -> None:
    """serial: the device opens (a pty stands in); modbus TCP: a closed port fails; iio: a sysfs-shaped
    tree reads, an empty root fails; with [[pipelines]] each pipeline's source gets its own line."""
    master, slave = os.openpty()
    try:
        tty = os.ttyname(slave)
        serial = write_config(tmp_path, None,
                              f'[sensors]\nsource = "serial"\n[sensors.serial]\ndevice = "{tty}"\n')
        (c,) = source_checks(cfgmod.load(serial), 5.0)
        assert c.status == "ok" and tty in c.reason
    finally:
        os.close(master)
        os.close(slave)
    missing = tmp_path / "ttyUSB9"
    gone = write_config(tmp_path, None,
                        f'[sensors]\nsource = "serial"\n[sensors.serial]\ndevice = "{missing}"\n')
    (c,) = source_checks(cfgmod.load(gone), 5.0)
    assert c.status == "FAIL" and "ttyUSB9" in c.reason and "dialout" in c.fix
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    modbus = write_config(tmp_path, None, f'[sensors]\nsource = "modbus"\n[sensors.modbus]\nport = {closed}\n'
                          '[[sensors.modbus.registers]]\nname = "t"\naddress = 0\n')
    assert source_checks(cfgmod.load(modbus), 5.0)[-1].status == "FAIL"
    dev = tmp_path / "iio" / "iio:device0"
    dev.mkdir(parents=True)
    (dev / "name").write_text("adxl345\n")
    (dev / "in_accel_x_raw").write_text("12\n")
    iio = write_config(tmp_path, None,
                       f'[sensors]\nsource = "iio"\n[sensors.iio]\nroot = "{tmp_path / "iio"}"\n'
                       'device = "adxl345"\n')
    (c,) = source_checks(cfgmod.load(iio), 5.0)
    assert c.status == "ok" and "iio:device0" in c.reason
    empty = write_config(tmp_path, None, f'[sensors]\nsource = "iio"\n[sensors.iio]\nroot = "{tmp_path}"\n'
                         'device = "adxl345"\n')
    (c,) = source_checks(cfgmod.load(empty), 5.0)
    assert c.status == "FAIL" and "adxl345" in c.reason
    multi = cfgmod.load(Path(__file__).resolve().parent.parent / "configs/examples/multi.toml")
    names = [c.name for c in source_checks(multi, 5.0)]
    assert names == [f"pipelines.{p.name}.source" for p in multi.pipelines] and len(names) == 2
