"""The static checks: cheap, offline, no interpreter and no broker. Every file the config names is
there and readable by the service user, the state dir is writable with room for the spool, the clock
is plausible. `edgeagent check-config`, `edgeagent check --static` (the unit's ExecStartPre) and
`edgeagent check` all run these."""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import shutil
import ssl
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edgeagent.check.result import Check, fail, info, ok, warn
from edgeagent.core.config import Config
from edgeagent.core.errors import ConfigError

SERVICE_USER = "edgeagent"  # scripts/install.sh creates it; the unit runs as it
# The clock is wrong if it reads earlier than this release was made (a board without a real-time
# clock boots in 1970 or at its last saved time until NTP answers).
RELEASED = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)
SPOOL_FILES = ("spool.sqlite", "spool.sqlite-wal", "spool.sqlite-shm")


@dataclass(frozen=True, slots=True)
class User:
    """Whose access the file checks judge: the service user, not whoever runs `check` (often root)."""

    name: str
    uid: int
    gids: frozenset[int]

    @property
    def is_me(self) -> bool:
        return self.uid == os.geteuid()


def service_user(name: str | None = None) -> User:
    """`name`, else the service user when root runs the check and that user exists, else ourselves.
    KeyError for a name that is not a user here."""
    if name is None:
        if os.geteuid() == 0 and _exists(SERVICE_USER):
            name = SERVICE_USER
        else:
            try:
                name = pwd.getpwuid(os.geteuid()).pw_name
            except KeyError:  # a container's uid without a passwd entry: the kernel still knows it
                return User(str(os.geteuid()), os.geteuid(), frozenset(os.getgroups()) | {os.getegid()})
    pw = pwd.getpwnam(name)
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
    return User(name, pw.pw_uid, frozenset(gids))


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def access_problem(path: Path, user: User, want: int = os.R_OK) -> str | None:
    """Why `user` cannot read (or write, `want=os.W_OK`) `path`, or None. For ourselves the kernel
    answers (ACLs, read-only mounts); for another user the mode bits of the file and of every
    directory above it."""
    if not path.exists():
        return f"{path}: no such file"
    if user.is_me:
        return None if os.access(path, want) else f"{path}: {_verb(want)} by {user.name}: permission denied"
    if user.uid == 0:
        return None
    for parent in reversed(path.absolute().parents):
        if not _allowed(parent.stat(), user, stat.S_IXUSR):
            return f"{path}: {user.name} cannot enter {parent} (mode {stat.filemode(parent.stat().st_mode)})"
    bit = stat.S_IRUSR if want == os.R_OK else stat.S_IWUSR
    st = path.stat()
    if not _allowed(st, user, bit):
        owner = _name(st.st_uid)
        return (f"{path}: not {_verb(want)} by {user.name} (owner {owner}, mode "
                f"{stat.filemode(st.st_mode)})")
    return None


def _verb(want: int) -> str:
    return "readable" if want == os.R_OK else "writable"


def _allowed(st: os.stat_result, user: User, owner_bit: int) -> bool:
    # owner_bit is the S_I?USR bit; the group and other bits sit 3 and 6 places lower
    if st.st_uid == user.uid:
        return bool(st.st_mode & owner_bit)
    if st.st_gid in user.gids:
        return bool(st.st_mode & (owner_bit >> 3))
    return bool(st.st_mode & (owner_bit >> 6))


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --------------------------------------------------------------------------- files the config names


def file_checks(cfg: Config, user: User) -> list[Check]:
    """TLS files, trusted keys, the model file and a CSV source's file: each exists and is readable."""
    checks = _tls_checks(cfg, user)
    checks += _key_checks(cfg, user)
    checks += model_file_checks(cfg, user)
    if cfg.sensors.source == "csv" and cfg.sensors.csv.path:
        checks.append(_readable("sensors.csv.path", Path(cfg.sensors.csv.path), user,
                                "put the recording there or correct sensors.csv.path"))
    return checks


def _readable(name: str, path: Path, user: User, fix: str) -> Check:
    problem = access_problem(path, user)
    if problem is None and not path.is_file():
        problem = f"{path}: not a regular file"
    return fail(name, problem, fix) if problem else ok(name, f"{path} readable by {user.name}")


def _tls_checks(cfg: Config, user: User) -> list[Check]:
    tls = cfg.mqtt.tls
    if not cfg.mqtt.host or not tls.enabled:
        return []
    checks: list[Check] = []
    fixes = {"ca_file": "copy the broker's CA certificate (PEM) there, or point mqtt.tls.ca_file at it",
             "cert_file": "copy this device's client certificate there, or correct mqtt.tls.cert_file",
             "key_file": f"copy the client key there (owner root, group {user.name}, mode 0640)"}
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if value:
            checks.append(_readable(f"mqtt.tls.{key}", Path(value), user, fixes[key]))
    if any(c.status == "FAIL" for c in checks):
        return checks
    try:  # the files are there: do they parse, and do the certificate and key belong together?
        ctx = ssl.create_default_context(cafile=tls.ca_file or None)
        if tls.cert_file:
            ctx.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        checks.append(fail("mqtt.tls", f"the TLS files do not load: {exc}",
                           "check they are PEM and that cert_file and key_file are one pair"))
    if tls.insecure_skip_verify:
        checks.append(warn("mqtt.tls.insecure_skip_verify", "the broker's certificate is not verified",
                           "set it to false outside a lab"))
    return checks


def _key_checks(cfg: Config, user: User) -> list[Check]:
    if not cfg.updates.enabled:
        return []
    if not cfg.updates.trusted_keys:
        return [warn("updates.trusted_keys", "no key is trusted: every update and desired config is refused",
                     "add the operators' public key: trusted_keys = { \"ops-2026\" = \"/etc/edgeagent/keys/"
                     "ops-2026.pem\" }")]
    from edgeagent.core.signing import load_public_key

    checks: list[Check] = []
    for key_id, value in cfg.updates.trusted_keys.items():
        name, path = f"updates.trusted_keys.{key_id}", Path(value)
        check = _readable(name, path, user, "install the public key (edgeagent keygen writes it) there")
        if check.status == "ok" and os.access(path, os.R_OK):
            try:
                load_public_key(path)
            except ConfigError as exc:
                check = fail(name, exc.errors[0], "use the .pem that `edgeagent keygen` wrote (public half)")
        checks.append(check)
    return checks


def model_location(cfg: Config) -> tuple[Path | None, str]:
    """The model file the pipeline would serve (the store's active version, else the shipped one it
    seeds the store from) and where it comes from; (None, why) when there is none."""
    from edgeagent.inference.store import SHIPPED_DIR, SHIPPED_FILES, ModelStore

    name = cfg.inference.model
    store = ModelStore(cfg.state_dir / "models")
    try:
        rec = store.active(name)
    except ValueError as exc:
        return None, str(exc)
    except OSError as exc:  # the state dir is not a directory: its own check says so
        rec = None
        if not isinstance(exc, NotADirectoryError):
            return None, f"cannot read the model store: {exc}"
    if rec is not None and store.model_path(name, rec.version).is_file():
        return store.model_path(name, rec.version), f"store {rec.tag}"
    shipped = SHIPPED_DIR / name / SHIPPED_FILES[cfg.inference.model_variant]
    if shipped.is_file():
        return shipped, f"shipped {name} ({cfg.inference.model_variant}; seeds the store on start)"
    why = f"model {name!r} is neither in the store ({store.model_dir(name)}) nor shipped with the agent"
    if rec is not None:
        why = f"the store names {rec.tag} but {store.model_path(name, rec.version)} is missing"
    return None, why


def model_file_checks(cfg: Config, user: User) -> list[Check]:
    if not cfg.inference.enabled:
        return [info("inference", "off (inference.enabled = false): no model to check")]
    try:
        path, where = model_location(cfg)
    except ValueError as exc:
        return [fail("inference.model", str(exc), "use a model name of letters, digits, '.', '_', '-'")]
    if path is None:
        return [fail("inference.model", where, "push the model (`edgeagent push --kind model`) or set "
                                               "inference.model to a shipped one (vibration-anomaly)")]
    check = _readable("inference.model", path, user, "fix the model file's owner or mode")
    return [check if check.status != "ok" else ok("inference.model", f"{where}: {path}")]


# --------------------------------------------------------------------------- state dir and clock


def state_dir_checks(cfg: Config, user: User, lenient: bool = False) -> list[Check]:
    """The state dir (or, before the first start, the directory it will be made in) takes a file,
    and its file system has room for the spool to reach spool.max_mb (a warning when `lenient`: the
    spool then drops its oldest rows sooner, the agent still runs)."""
    state = cfg.state_dir
    name = "device.state_dir"
    fix = (f"create it for the service user: install -d -o {user.name} -m 0750 {state}, or set "
           "device.state_dir")
    target = state
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return [fail(name, f"{state}: {target} is not a directory", fix)]
    problem = _write_problem(target) or (None if user.is_me else access_problem(target, user, os.W_OK))
    if problem:
        return [fail(name, f"{state}: {problem}", fix)]
    checks = [ok(name, f"{state} writable by {user.name}" if target == state
                 else f"{state} does not exist yet; {target} is writable, the agent makes it")]
    spool_now = sum((state / f).stat().st_size for f in SPOOL_FILES if (state / f).is_file())
    need = int(cfg.spool.max_mb * 2**20) - spool_now
    free = shutil.disk_usage(target).free
    if free < need:
        verdict = warn if lenient else fail
        checks.append(verdict("spool.max_mb", f"{free / 2**20:.0f} MiB free on {target}; the spool may grow "
                                              f"{need / 2**20:.0f} MiB more (cap {cfg.spool.max_mb:g} MB)",
                              "free space there or lower spool.max_mb"))
    else:
        checks.append(ok("spool.max_mb", f"{free / 2**20:.0f} MiB free, spool cap {cfg.spool.max_mb:g} MB"))
    return checks


def _write_problem(directory: Path) -> str | None:
    """Make and remove a file there: the only answer that holds for read-only mounts and immutable
    directories (root passes every mode check)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".edgeagent-check-")
    except OSError as exc:
        return f"cannot create a file in {directory}: {exc.strerror or exc}"
    os.close(fd)
    os.unlink(tmp)
    return None


def clock_check(now: float | None = None, lenient: bool = False) -> Check:
    """FAIL for a clock before the release; only a warning when `lenient` (at service start a board
    without a real-time clock may boot offline: it must still run and spool)."""
    now = time.time() if now is None else now
    shown = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if now < RELEASED.timestamp():
        verdict = warn if lenient else fail
        return verdict("clock", f"reads {shown}, before this release ({RELEASED:%Y-%m-%d}): expiry of "
                                "signed messages, TLS certificates and timestamps will all be wrong",
                       "enable NTP (timedatectl set-ntp true) or set the date; a board without a "
                       "real-time clock needs network time before the agent starts")
    return ok("clock", shown)


def static_checks(cfg: Config, user: User, lenient: bool = False) -> list[Check]:
    """Files, state dir, clock: what every check runs. `lenient` (`check --static`, the unit's
    ExecStartPre) makes a wrong clock and a full disk warnings, since the agent can run with them and
    a FAIL there would keep the service from starting."""
    return [*file_checks(cfg, user), *state_dir_checks(cfg, user, lenient), clock_check(lenient=lenient)]
