"""Live remote configuration: `P/D/config/desired` -> verify -> validate -> apply -> persist -> report.

A desired config is `{"v":1,"type":"config","version":n,"config":{partial TOML as JSON},"sig":{...}}`,
signed with the same trusted keys as updates; `"type":"config"` and an optional
`"targets":{"devices":[...],"groups":[...]}` are inside the signed bytes, so a manifest or a config
meant for another device is refused here. Its `config` is merged over the local file (the applied layer
*replaces* the previous remote layer; arrays such as `rules` are replaced whole), validated by the
same `config.build` as `check-config`, swapped in live, persisted atomically as
`<state_dir>/config.applied.toml` and reported retained on `P/D/config/reported`
(`sha256` = SHA-256 of the canonical JSON of `config`).

Versions must increase: a version at or below the highest verified one seen (a retained message
redelivered after a reconnect, or a replay) is ignored without a new report, so the retained report
keeps describing what runs. A message that does not verify (unsigned, badly signed, unparsable)
could come from anyone who can publish on the broker: it is refused through `Rejections` (one
event per reason per window, with a count) and never touches the retained report nor that mark.
A verified one that fails validation is the operator's own mistake: reported `rejected`.

Before a layer is swapped in it is dry-run: no local-only key (core.layer_checks.LOCAL_ONLY: trusted
keys, firmware installer, broker identity and TLS, ...), every file it names usable now, and a model
it names present; a layer failing any of that is rejected with the key path and nothing changes.

Safety net: after applying, the new config is on probation for `config.confirm_timeout_s`. If the
broker stays unreachable that long, or any component crashes meanwhile, the last confirmed config
comes back (live; with a restart when restart-only keys were in effect) and `rolled_back` is
reported once the broker is back. A config applied but not yet confirmed when the agent restarts
(restart-only keys take effect then) goes through the same probation at start; one the agent has
started with MAX_UNCONFIRMED_STARTS times without confirming it (it dies before its probation ends)
is given up by `load_effective` itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

from edgeagent.core import audience, protocol
from edgeagent.core.config import Config, RemoteConfigConfig
from edgeagent.core.config_layers import (
    AppliedState,
    ConfigLayers,
    check_remote_layer,
    load_effective,
    read_applied,
    restart_paths,
    write_applied,
)
from edgeagent.core.errors import ConfigError, ProtocolError, RemoteConfigRejected, SignatureInvalid
from edgeagent.core.layer_checks import local_only_errors
from edgeagent.core.live import LiveConfig, Outbox, Router
from edgeagent.core.logs import Once
from edgeagent.core.rejections import Rejections
from edgeagent.core.signing import load_trusted_keys, verify
from edgeagent.core.tasks import wait_event
from edgeagent.inference.store import SHIPPED_DIR, SHIPPED_FILES, ModelStore, check_name

__all__ = ["Desired", "RemoteConfigComponent", "config_sha256", "load_effective", "model_errors",
           "parse_desired"]
log = logging.getLogger(__name__)
_once = Once(log)

MAX_PAYLOAD_BYTES = 256 * 1024
PROBATION_TICK_S = 0.25  # how often the broker link is looked at while a config is on probation
_REASON_KEY = re.compile(r"^[a-z][a-z0-9 _-]{0,31}\Z")  # "signature", "version", "malformed JSON"


def config_sha256(partial: dict[str, Any]) -> str:
    """What `reported.sha256` is: over the canonical JSON of the desired message's `config`."""
    body = json.dumps(partial, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Desired:
    version: int
    sha256: str
    config: dict[str, Any]
    key_id: str


def parse_desired(topic: str, payload: bytes, trusted: dict[str, Any], device_id: str,
                  groups: Sequence[str]) -> Desired:
    """Decode and verify a desired-config message meant for this device (`device_id`, `groups`);
    RemoteConfigRejected says why not (with the version when it could be read). The layer's own
    validity is checked by the caller."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RemoteConfigRejected(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        msg = protocol.loads_object(topic, payload)
    except ProtocolError as exc:
        raise RemoteConfigRejected(exc.reason) from exc
    except RecursionError as exc:
        raise RemoteConfigRejected("malformed JSON: nested too deeply") from exc
    version = msg.get("version")
    # up to 2^53-1: the integers every signer's JSON reads exactly (and RFC 8785 can sign)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version < 2**53:
        shown = repr(version) if not isinstance(version, int) or version < 10**20 else "a huge integer"
        raise RemoteConfigRejected(f"version: expected a positive integer below 2^53, got {shown[:80]}")
    partial = msg.get("config")
    if not isinstance(partial, dict):
        raise RemoteConfigRejected(f"config: expected an object, got {type(partial).__name__}", version)
    if not trusted:
        raise RemoteConfigRejected("no trusted keys configured (updates.trusted_keys)", version)
    try:
        key_id = verify(msg, trusted, "config")
    except SignatureInvalid as exc:
        raise RemoteConfigRejected(f"signature: {exc.reason}", version) from exc
    try:
        not_ours = audience.problem(audience.parse(msg.get("targets")), device_id, groups)
    except audience.AudienceError as exc:
        raise RemoteConfigRejected(str(exc), version) from exc
    if not_ours is not None:
        raise RemoteConfigRejected(not_ours, version)
    return Desired(version, config_sha256(partial), partial, key_id)


def model_errors(partial: Mapping[str, Any], new: Config) -> list[str]:
    """A layer naming a model (or variant) must name one this device can load at its next start: in
    its store or shipped with the agent. Blocking (file system): call it from a thread."""
    inference = partial.get("inference")
    if (not isinstance(inference, Mapping) or not {"model", "model_variant"} & inference.keys()
            or not new.inference.enabled):
        return []
    name = new.inference.model
    try:
        check_name("name", name)
    except ValueError as exc:
        return [f"inference.model: {exc}"]
    store = ModelStore(new.state_dir / "models")
    rec = store.active(name)
    if rec is not None and store.model_path(name, rec.version).is_file():
        return []
    if (SHIPPED_DIR / name / SHIPPED_FILES[new.inference.model_variant]).is_file():
        return []
    return [f"inference.model: no model {name!r} ({new.inference.model_variant}) in "
            f"{store.model_dir(name)} and none shipped under that name"]


def _reason_key(reason: str) -> str:
    """A short, stable key for `Rejections` from a parse failure ("signature: bad ..." -> "signature");
    never free text from the sender, so a flood cannot grow the table of reasons."""
    head = reason.partition(":")[0]
    return "config-" + (head.replace(" ", "-") if ":" in reason and _REASON_KEY.match(head)
                        else "unverified")


@dataclass
class Probation:
    started: float
    disconnected_since: float | None
    timeout_s: float  # from the config before the change too: a bad push cannot stretch its own probation
    crash: str | None = None


class RemoteConfigComponent:
    name = "remote-config"

    def __init__(self, live: LiveConfig, outbox: Outbox, router: Router, layers: ConfigLayers,
                 request_restart: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rejections: Rejections | None = None) -> None:
        self.live = live
        self.outbox = outbox
        self.router = router
        self.clock = clock
        # finishing a rollback of restart-only keys needs a new process (the agent turns the
        # request into a non-zero exit, which systemd's Restart=on-failure turns into one)
        self._restart = request_restart
        self.state = AppliedState()
        self.probation: Probation | None = None
        self._layers = layers
        self._latest: bytes | None = None  # only the newest desired payload matters: older are replaced
        self._wake = asyncio.Event()
        self.restart_requested: str | None = None
        # unverified messages: counted per reason, one event per window (a flood is not an amplifier)
        self.rejections = rejections if rejections is not None else Rejections(outbox, clock)

    @property
    def layers(self) -> ConfigLayers:
        return self._layers

    async def __aenter__(self) -> RemoteConfigComponent:
        cfg = self.live.config
        applied = await asyncio.to_thread(read_applied, cfg.state_dir)
        self.state = applied or AppliedState()
        if self.state.report:
            # re-assert what this device runs (also delivers a rollback report made before a restart)
            self.outbox.put_state(self.live.topics.config_reported, self.state.report)
        if not cfg.config.enabled:
            return self
        if not self.state.confirmed:
            now = self.clock()
            default_s = RemoteConfigConfig().confirm_timeout_s
            self.probation = Probation(now, now, min(cfg.config.confirm_timeout_s, default_s))
            log.info("config on probation after start", extra={"kv": {"version": self.state.version}})
        self.router.subscribe(self.live.topics.config_desired, self._on_desired)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    def section(self) -> dict[str, Any]:
        return {"version": self.state.version, "sha256": self.state.sha256,
                "confirmed": self.state.confirmed, "good_version": self.state.good_version}

    # -- inputs (run on the event loop; must not block)

    async def _on_desired(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # the retained message was cleared
        self._latest = payload
        self._wake.set()

    def on_crash(self, component: str, error: str) -> None:
        """The agent's supervisor calls this when a component crashes: during probation that
        counts against the new config."""
        if self.probation is not None and self.probation.crash is None:
            self.probation.crash = f"component {component} failed: {error}"
            self._wake.set()

    # -- the loop

    async def run(self) -> None:
        if not self.live.config.config.enabled:
            return
        while True:
            self._wake.clear()
            payload, self._latest = self._latest, None
            try:
                if payload is not None:
                    await self.handle(payload)
                if self.probation is not None:
                    await self.check_probation()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end remote config (nor the safety net) for good
                _once.warning("turn", "remote config turn failed", exc_info=True)
            self.rejections.flush()
            # once anything was refused, wake now and then to send the count of its window
            timeout = (PROBATION_TICK_S if self.probation is not None
                       else self.rejections.window_s if self.rejections.totals else None)
            await wait_event(self._wake, timeout)

    async def handle(self, payload: bytes) -> None:
        """One desired message: applied, rejected (reported), refused (not verified: counted, no
        report) or ignored (old version)."""
        topic = self.live.topics.config_desired
        try:
            try:
                trusted: dict[str, Any] = await asyncio.to_thread(
                    load_trusted_keys, self.live.config.updates.trusted_keys)
            except ConfigError as exc:
                raise RemoteConfigRejected("trusted keys unreadable: " + "; ".join(exc.errors)) from exc
            device = self.live.config.device
            desired = parse_desired(topic, payload, trusted, device.id, device.groups)
        except RemoteConfigRejected as exc:
            self._refuse(exc, payload)
            return
        version = desired.version
        if version <= self.state.seen_version:
            if version < self.state.seen_version:
                log.warning("ignoring desired config version %d: not above %d", version,
                            self.state.seen_version)
            return
        self.state.seen_version = version  # a verified version is never considered again
        try:
            await self._apply(desired)
        except RemoteConfigRejected as exc:
            reason = _printable(exc.reason)
            if self.state.version:
                reason += f" (still running version {self.state.version})"
            report = protocol.config_reported(version, desired.sha256, "rejected", reason)
            self.outbox.put_state(self.live.topics.config_reported, report)
            self.outbox.emit_event("config", "warning", f"desired config rejected: {reason}",
                                   {"version": version, "reason": reason, "key_id": desired.key_id})
            await self._persist_quietly()  # keeps seen_version: a rejected version is not retried

    def _refuse(self, exc: RemoteConfigRejected, payload: bytes) -> None:
        """Anyone who can publish may have sent it: what it claims (its version above all) must not
        reach the retained report, only an aggregated count."""
        reason = _printable(exc.reason)
        self.rejections.refuse("config", _reason_key(exc.reason),
                               f"desired config refused (not verified): {reason}",
                               {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()})

    async def _apply(self, desired: Desired) -> None:
        local = local_only_errors(desired.config)
        if local:  # named alone: "updates.trusted_keys is local-only"
            raise RemoteConfigRejected("; ".join(local), desired.version)
        errors = check_remote_layer(desired.config)
        if errors:
            raise RemoteConfigRejected("invalid: " + "; ".join(errors), desired.version)
        try:
            new = self.layers.build(desired.config)
            await asyncio.to_thread(self._dry_run, desired.config, new)
        except ConfigError as exc:
            raise RemoteConfigRejected("invalid: " + "; ".join(exc.errors), desired.version) from exc
        prev, timeout_s = self.state, self.live.config.config.confirm_timeout_s
        good = (prev.version, prev.sha256, prev.config) if prev.confirmed else (
            prev.good_version, prev.good_sha256, prev.good_config)
        pending_keys = restart_paths(self.layers.boot, new)
        reason = (f"restart needed for: {', '.join(pending_keys)} (applied on next start)"
                  if pending_keys else "")
        report = protocol.config_reported(desired.version, desired.sha256, "applied", reason)
        state = AppliedState(desired.version, desired.sha256, desired.config, confirmed=False,
                             seen_version=prev.seen_version, good_version=good[0], good_sha256=good[1],
                             good_config=good[2], report=report)
        try:
            await asyncio.to_thread(write_applied, self.live.config.state_dir, state)
        except OSError as exc:
            raise RemoteConfigRejected(f"cannot persist: {exc}", desired.version) from exc
        self.state = state
        self.layers.set_remote(desired.config)
        self.outbox.put_state(self.live.topics.config_reported, report)
        self.outbox.emit_event("config", "info", f"config version {desired.version} applied",
                            {"version": desired.version, "sha256": desired.sha256, "key_id": desired.key_id,
                             "restart_needed": pending_keys})
        now = self.clock()
        timeout_s = min(timeout_s, self.live.config.config.confirm_timeout_s)
        self.probation = Probation(now, None if self._connected() else now, timeout_s)
        log.info("config applied",
                 extra={"kv": {"version": desired.version, "restart": ",".join(pending_keys)}})

    def _dry_run(self, layer: dict[str, Any], new: Config) -> None:
        """Blocking: every file and model the layer names must be usable before it goes live."""
        self.layers.dry_run(layer, new)
        errors = model_errors(layer, new)
        if errors:
            raise ConfigError(errors, "remote config")

    # -- probation

    def _connected(self) -> bool:
        if not self.live.config.mqtt.host:
            return True  # offline by design: nothing to lose contact with
        return bool(self.router.connected)

    async def check_probation(self) -> None:
        p = self.probation
        assert p is not None
        now = self.clock()
        timeout_s = p.timeout_s
        if p.crash is not None:
            await self.rollback(p.crash)
            return
        if self._connected():
            p.disconnected_since = None
        elif p.disconnected_since is None:
            p.disconnected_since = now
        if p.disconnected_since is not None and now - p.disconnected_since >= timeout_s:
            await self.rollback(f"broker unreachable for {timeout_s:g}s after applying")
        elif p.disconnected_since is None and now - p.started >= timeout_s:
            await self.confirm()

    async def confirm(self) -> None:
        st = self.state
        self.state = replace(st, confirmed=True, good_version=st.version, good_sha256=st.sha256,
                             good_config=st.config, starts=0)
        self.probation = None
        await self._persist_quietly()
        log.info("config confirmed", extra={"kv": {"version": st.version}})
        self.outbox.emit_event("config", "info", f"config version {st.version} confirmed",
                            {"version": st.version, "sha256": st.sha256})

    async def rollback(self, why: str) -> None:
        bad = self.state
        self.probation = None
        self.state = bad.rolled_back(why)
        report, reason = self.state.report, self.state.report["reason"]
        await self._persist_quietly()
        try:
            pending = self.layers.set_remote(bad.good_config, keep_restart_keys=False)
        except ConfigError as exc:  # the good layer validated before; only a schema change gets here
            log.error("last good config no longer validates: %s", exc)
            pending = self.layers.set_remote({}, keep_restart_keys=False)
        self.outbox.put_state(self.live.topics.config_reported, report)
        self.outbox.emit_event("config", "critical", f"config version {bad.version} rolled back: {why}",
                            {"version": bad.version, "reason": reason, "restart_needed": pending})
        log.error("config rolled back", extra={"kv": {"version": bad.version, "reason": why}})
        if pending:
            self._request_restart(f"config rollback needs a restart for {', '.join(pending)}")

    def _request_restart(self, reason: str) -> None:
        self.restart_requested = reason
        if self._restart is None:
            log.critical("%s: restart edgeagent to finish the rollback", reason)
        else:
            self._restart(reason)

    async def _persist_quietly(self) -> None:
        try:
            await asyncio.to_thread(write_applied, self.live.config.state_dir, self.state)
        except (OSError, ValueError) as exc:
            log.error("cannot persist %s: %s", "config.applied.toml", exc)


def _printable(reason: str) -> str:
    """What a sender wrote may end up in a reason: keep it encodable as JSON and TOML."""
    return reason.encode("utf-8", "backslashreplace").decode("utf-8")
