"""Hostile publishers (issue 21): someone who can publish on the broker but holds no signing key, or
replays what the operator signed, against real agents (`edgeagent run`) and a real Mosquitto.

Every case checks, through `World.refused` (tests/hostile_util.py): the message is refused with a
reason naming the cause; nothing but the aggregated event reaches the state dir; telemetry goes on.
docs/security.md lists these cases with what each defends.

Agents: dev1 (group line1) holds a firmware job `live-1` waiting for chunks (the target of cancels
and chunk tricks); dev2 (group line2) takes the audience and remote-config cases; the flood gets a
fresh dev3 of its own, so its RSS is measured from a clean start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker
from tests.hostile_util import AgentProc, World, dumps, now_s, raw_sign, start_agents
from tests.transport_util import Observer
from tests.util import wait_until

pytestmark = pytest.mark.integration

LIVE = "live-1"
MIB = 1024 * 1024
FAKE_SHA = "ab" * 32


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from tests.hostile_util import Operator

    root = tmp_path_factory.mktemp("hostile")
    broker = Broker(workdir=root / "broker").start()
    observer = Observer(
        broker.port,
        ("edge/+/telemetry", "edge/+/events", "edge/+/updates/+/status", "edge/+/config/reported"),
        client_id=f"hostile-{time.monotonic_ns()}",
    )
    w = World(broker, observer, Operator.make(root / "keys"))
    try:
        start_agents(w, root, {"dev1": ["line1"], "dev2": ["line2"]})
        # the job every cancel and chunk trick aims at: accepted, then waiting for chunks
        w.live_manifest = w.op.signed_manifest(LIVE, devices=["dev1"])
        w.publish(f"edge/dev1/updates/{LIVE}/manifest", w.live_manifest)
        wait_until(
            lambda: w.agents["dev1"].journal_jobs().get(LIVE, {}).get("state") == "downloading",
            20,
            message=f"{LIVE} downloading",
        )
        w.wait_telemetry("dev1", w.seq("dev1"))
        yield w
    finally:
        for device in ("dev1", "dev2"):
            w.publish(f"edge/{device}/config/desired", b"", retain=True)  # no retained junk left
        for agent in w.agents.values():
            agent.stop()
        observer.close()
        broker.stop()


def live_state(w: World) -> str | None:
    return w.agents["dev1"].journal_jobs().get(LIVE, {}).get("state")


# --------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    device: str
    act: Callable[[World], None]
    reason: str  # regex: the refusal must name this cause
    job: str | None = None  # a forged job: no updates/<job>/, no journal entry
    allow: tuple[str, ...] = ()  # state-dir paths that may change (the live job's capped log)
    broker_log: bool = False
    no_report: bool = False  # unverified desired config: config/reported must not be rewritten
    signed_reject: bool = False  # verified, refused by policy: may be journaled `rejected` (replay no-op)
    after: Callable[[World], None] | None = None


def pub(
    topic: str, make: Callable[[World], bytes | dict[str, Any] | list[Any]], retain: bool = False
) -> Callable[[World], None]:
    return lambda w: w.publish(topic, make(w), retain=retain)


def manifest_topic(job: str, device: str = "dev1") -> str:
    return f"edge/{device}/updates/{job}/manifest"


def live_still_downloading(w: World) -> None:
    assert live_state(w) == "downloading", f"{LIVE} is {live_state(w)}: the refused message changed it"


LIVE_LOG = (rf"updates/{LIVE}/log\.txt",)  # the live job's log (capped) may note a refused chunk
CANCEL = f"edge/dev1/updates/{LIVE}/cancel"
DESIRED = "edge/dev2/config/desired"
TYPE = r"type"
SIGNATURE = r"signature|not signed|unknown key"


def m(w: World, job: str, sign: bool = True, **kw: Any) -> dict[str, Any]:
    kw.setdefault("devices", ["dev1"])
    msg = w.op.manifest(job, **kw)
    return w.op.sign(msg) if sign else msg


def tampered(field: str, value: Any) -> Callable[[World], dict[str, Any]]:
    def make(w: World) -> dict[str, Any]:
        signed = m(w, f"tamper-{field}")
        if field == "targets":
            signed = w.op.sign(w.op.manifest(f"tamper-{field}", devices=["dev2"]))
        return {**signed, field: value}

    return make


def without(msg: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k not in keys}


def huge_chunk_manifest(w: World) -> dict[str, Any]:
    size = 32 * MIB  # chunk_size 1: 33 million chunks of per-chunk state, no per-chunk hash possible
    return w.op.sign(
        without(
            w.op.manifest("tiny-chunks", devices=["dev1"], size=size, chunk_size=1, chunks=size),
            "chunk_sha256",
        )
    )


def many_chunks_manifest(w: World) -> dict[str, Any]:
    chunks = 70_000  # 4 KiB each: 273 MiB, under the 512 MiB artifact cap
    return w.op.sign(
        without(
            w.op.manifest(
                "many-chunks", devices=["dev1"], size=chunks * 4096, chunk_size=4096, chunks=chunks
            ),
            "chunk_sha256",
        )
    )


def oversize_manifest(w: World) -> dict[str, Any]:
    chunks = 600  # 600 MiB > updates.max_artifact_mb (512)
    return w.op.sign(
        w.op.manifest(
            "too-big",
            devices=["dev1"],
            size=chunks * MIB,
            chunk_size=MIB,
            chunks=chunks,
            chunk_sha256=[FAKE_SHA] * chunks,
        )
    )


def signed_config(
    config: dict[str, Any], devices: list[str] | None = None
) -> Callable[[World], dict[str, Any]]:
    return lambda w: w.op.sign(w.op.desired(w.next_version(), config, devices or ["dev2"]))


def manifest_text_with(field: str, literal: str) -> Callable[[World], bytes]:
    """A signed manifest whose JSON text has `field` replaced by a number no parser holds exactly."""

    def make(w: World) -> bytes:
        doc = m(w, f"huge-{field}")
        text = dumps(doc).decode()
        old = f'"{field}":{doc[field]}'
        assert old in text
        return text.replace(old, f'"{field}":{literal}').encode()

    return make


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_config(w: World) -> bytes:
    # 40,000 levels (200 KB): under the 256 KiB cap, so the parser itself meets the nesting
    inner = '{"a":' * 40_000 + "1" + "}" * 40_000
    return (
        f'{{"v":1,"type":"config","version":{w.next_version()},"config":{inner},'
        f'"targets":{{"devices":["dev2"]}}}}'
    ).encode()


def chunk_index_case(index: str) -> Case:
    def act(w: World) -> None:
        w.publish(f"edge/dev1/updates/{LIVE}/chunk/{index}", b"\x00" * 4096)

    return Case(
        f"chunk-index-{index.encode('unicode_escape').decode() or 'empty'}",
        "dev1",
        act,
        r"index|chunk",
        allow=LIVE_LOG,
        after=live_still_downloading,
    )


def orphan_chunks(w: World) -> None:
    for i in range(5):
        w.publish(f"edge/dev1/updates/orphan-1/chunk/{i}", b"\x01" * 4096)


def replay_a_on_b(w: World) -> None:
    signed = w.op.signed_manifest("ab-1", devices=["dev1"])
    w.publish(manifest_topic("ab-1", "dev2"), signed)
    for i, part in enumerate(w.op.chunks()):
        w.publish(f"edge/dev2/updates/ab-1/chunk/{i}", part)


CASES: list[Case] = [
    # --- domain separation: a signed message is only what its type says, on its own topic
    Case(
        "manifest-replayed-as-cancel",
        "dev1",
        pub(CANCEL, lambda w: w.live_manifest),
        TYPE,
        after=live_still_downloading,
    ),
    Case(
        "cancel-without-type",
        "dev1",
        pub(CANCEL, lambda w: raw_sign(without(w.op.cancel(LIVE, ["dev1"]), "type"), w.op.key)),
        TYPE,
        after=live_still_downloading,
    ),
    Case(
        "cancel-for-another-job",
        "dev1",
        pub(CANCEL, lambda w: w.op.sign(w.op.cancel("other-job", ["dev1"]))),
        r"names job|other-job",
        after=live_still_downloading,
    ),
    Case(
        "cancel-for-another-device",
        "dev1",
        pub(CANCEL, lambda w: w.op.sign(w.op.cancel(LIVE, ["dev2"]))),
        r"not for this device|targets",
        after=live_still_downloading,
    ),
    Case(
        "manifest-topic-type-cancel",
        "dev1",
        pub(manifest_topic("wt-cancel"), lambda w: m(w, "wt-cancel", type="cancel")),
        TYPE,
        job="wt-cancel",
    ),
    Case(
        "manifest-topic-type-config",
        "dev1",
        pub(manifest_topic("wt-config"), lambda w: m(w, "wt-config", type="config")),
        TYPE,
        job="wt-config",
    ),
    Case(
        "manifest-topic-type-unknown",
        "dev1",
        pub(manifest_topic("wt-support"), lambda w: m(w, "wt-support", type="support")),
        TYPE,
        job="wt-support",
    ),
    Case(
        "cancel-topic-type-config",
        "dev1",
        pub(CANCEL, lambda w: w.op.sign({**w.op.cancel(LIVE, ["dev1"]), "type": "config"})),
        TYPE,
        after=live_still_downloading,
    ),
    Case(
        "cancel-topic-type-manifest",
        "dev1",
        pub(CANCEL, lambda w: w.op.sign({**w.op.cancel(LIVE, ["dev1"]), "type": "manifest"})),
        TYPE,
        after=live_still_downloading,
    ),
    Case(
        "config-topic-type-manifest",
        "dev2",
        pub(
            DESIRED,
            lambda w: w.op.sign({**w.op.desired(w.next_version(), {}, ["dev2"]), "type": "manifest"}),
            retain=True,
        ),
        TYPE,
        no_report=True,
    ),
    Case(
        "config-topic-type-cancel",
        "dev2",
        pub(
            DESIRED,
            lambda w: w.op.sign({**w.op.desired(w.next_version(), {}, ["dev2"]), "type": "cancel"}),
            retain=True,
        ),
        TYPE,
        no_report=True,
    ),
    Case(
        "manifest-without-type",
        "dev1",
        pub(
            manifest_topic("no-type"),
            lambda w: raw_sign(without(m(w, "no-type", sign=False), "type"), w.op.key),
        ),
        TYPE,
        job="no-type",
    ),
    Case(
        "config-without-type",
        "dev2",
        pub(
            DESIRED,
            lambda w: raw_sign(without(w.op.desired(w.next_version(), {}, ["dev2"]), "type"), w.op.key),
            retain=True,
        ),
        TYPE,
        no_report=True,
    ),
    # --- audience: signed for one device or group, replayed elsewhere
    Case(
        "manifest-of-dev1-replayed-on-dev2", "dev2", replay_a_on_b, r"not for this device|targets", job="ab-1"
    ),
    Case(
        "group-manifest-on-group-topic-outside-group",
        "dev2",
        pub("edge/group/line2/updates/g-1/manifest", lambda w: w.op.signed_manifest("g-1", groups=["line1"])),
        r"not for this device|groups",
        job="g-1",
    ),
    Case(
        "group-manifest-on-device-topic-outside-group",
        "dev2",
        pub(manifest_topic("g-2", "dev2"), lambda w: w.op.signed_manifest("g-2", groups=["line1"])),
        r"not for this device|groups",
        job="g-2",
    ),
    # --- signatures
    Case(
        "unknown-key-id",
        "dev1",
        pub(
            manifest_topic("unknown-key"),
            lambda w: raw_sign(m(w, "unknown-key", sign=False), w.op.attacker, "nobody"),
        ),
        r"unknown key",
        job="unknown-key",
    ),
    Case(
        "bad-signature",
        "dev1",
        pub(manifest_topic("bad-sig"), lambda w: raw_sign(m(w, "bad-sig", sign=False), w.op.attacker)),
        r"bad signature|signature",
        job="bad-sig",
    ),
    Case(
        "unsigned-manifest",
        "dev1",
        pub(manifest_topic("unsigned"), lambda w: m(w, "unsigned", sign=False)),
        SIGNATURE,
        job="unsigned",
    ),
    Case(
        "tampered-version",
        "dev1",
        pub(manifest_topic("tamper-version"), tampered("version", "99.0.0")),
        r"signature",
        job="tamper-version",
    ),
    Case(
        "tampered-sha256",
        "dev1",
        pub(manifest_topic("tamper-sha256"), tampered("sha256", FAKE_SHA)),
        r"signature",
        job="tamper-sha256",
    ),
    Case(
        "tampered-targets",
        "dev1",
        pub(manifest_topic("tamper-targets"), tampered("targets", {"devices": ["dev1"]})),
        r"signature",
        job="tamper-targets",
    ),
    # --- policy on verified manifests
    Case(
        "expired",
        "dev1",
        pub(manifest_topic("expired"), lambda w: m(w, "expired", issued_at=now_s() - 7200, ttl_s=3600)),
        r"expired",
        job="expired",
        signed_reject=True,
    ),
    Case(
        "downgrade",
        "dev1",
        pub(manifest_topic("downgrade"), lambda w: m(w, "downgrade", version="4.0.0")),
        r"rollback|not above|downgrade",
        job="downgrade",
        signed_reject=True,
    ),
    Case(
        "same-version",
        "dev1",
        pub(manifest_topic("same-ver"), lambda w: m(w, "same-ver", version="5.0.0")),
        r"rollback|not above",
        job="same-ver",
        signed_reject=True,
    ),
    # --- bounds on every signed number
    Case(
        "chunks-inconsistent",
        "dev1",
        pub(
            manifest_topic("bad-chunks"), lambda w: m(w, "bad-chunks", chunks=4, chunk_sha256=[FAKE_SHA] * 4)
        ),
        r"mismatch|chunks",
        job="bad-chunks",
    ),
    Case(
        "size-inconsistent",
        "dev1",
        pub(manifest_topic("bad-size"), lambda w: m(w, "bad-size", size=3 * 4096 + 1)),
        r"mismatch|size",
        job="bad-size",
    ),
    Case(
        "chunk-size-1-huge-size",
        "dev1",
        pub(manifest_topic("tiny-chunks"), huge_chunk_manifest),
        r"chunk",
        job="tiny-chunks",
    ),
    Case(
        "too-many-chunks",
        "dev1",
        pub(manifest_topic("many-chunks"), many_chunks_manifest),
        r"chunk",
        job="many-chunks",
    ),
    Case(
        "size-above-cap",
        "dev1",
        pub(manifest_topic("too-big"), oversize_manifest),
        r"too large|limit",
        job="too-big",
        signed_reject=True,
    ),
    Case(
        "missing-chunk-sha256",
        "dev1",
        pub(
            manifest_topic("no-chunk-sha"),
            lambda w: w.op.sign(without(m(w, "no-chunk-sha", sign=False), "chunk_sha256")),
        ),
        r"chunk_sha256",
        job="no-chunk-sha",
    ),
    # --- strict topic numbers (`+1` cannot be sent: a wildcard is no topic name)
    *[chunk_index_case(i) for i in ("\u00b2", "\u0661", "-1", "0000000001", "1234567890", " 1", "1 ", "0x1")],
    Case(
        "orphan-chunks",
        "dev1",
        orphan_chunks,
        r"orphan|no (such |known )?job|unknown job|not expected",
        job="orphan-1",
    ),
    Case(
        "oversize-chunk-message",
        "dev1",
        pub(f"edge/dev1/updates/{LIVE}/chunk/0", lambda w: b"\x02" * (8 * MIB)),
        r"too large|length|bytes",
        allow=LIVE_LOG,
        broker_log=True,
        after=live_still_downloading,
    ),
    # --- parsing
    Case(
        "malformed-json-manifest",
        "dev1",
        pub(manifest_topic("malformed"), lambda w: b'{"v":1,"job":'),
        r"malformed|JSON",
        job="malformed",
    ),
    Case(
        "malformed-json-cancel",
        "dev1",
        pub(CANCEL, lambda w: b'{"v":1,"type":"cancel",'),
        r"malformed|JSON",
        after=live_still_downloading,
    ),
    Case(
        "malformed-json-config",
        "dev2",
        pub(DESIRED, lambda w: b'{"v":1,"version":', retain=True),
        r"malformed|JSON",
        no_report=True,
    ),
    Case(
        "json-array-manifest",
        "dev1",
        pub(manifest_topic("array"), lambda w: b"[1,2,3]"),
        r"object",
        job="array",
    ),
    Case(
        "json-string-config",
        "dev2",
        pub(DESIRED, lambda w: b'"config"', retain=True),
        r"object",
        no_report=True,
    ),
    Case(
        "number-1e999-size",
        "dev1",
        pub(manifest_topic("huge-size"), manifest_text_with("size", "1e999")),
        r"integer|finite|signature|number",
        job="huge-size",
    ),
    Case(
        "number-5000-digits-size",
        "dev1",
        pub(manifest_topic("huge-issued_at"), manifest_text_with("issued_at", "9" * 5000)),
        r"malformed|digits|integer|signature",
        job="huge-issued_at",
    ),
    Case(
        "number-5000-digits-config-version",
        "dev2",
        pub(
            DESIRED,
            lambda w: ('{"v":1,"type":"config","version":' + "9" * 5000 + ',"config":{}}').encode(),
            retain=True,
        ),
        r"malformed|digits|version",
        no_report=True,
    ),
    Case(
        "number-1e999-cancel",
        "dev1",
        pub(CANCEL, lambda w: f'{{"v":1,"type":"cancel","job":"{LIVE}","issued_at":1e999}}'.encode()),
        r"issued_at|signature|finite|malformed",
        after=live_still_downloading,
    ),
    Case(
        "deeply-nested-manifest",
        "dev1",
        pub(manifest_topic("nested"), lambda w: nested(100_000)),
        r"nest|deep|malformed|recursion|object",
        job="nested",
    ),
    Case(
        "deeply-nested-config",
        "dev2",
        pub(DESIRED, nested_config, retain=True),
        r"nest|deep|malformed|recursion|signature",
        no_report=True,
    ),
    # --- remote config that would disarm the device
    Case(
        "config-unsigned",
        "dev2",
        pub(
            DESIRED,
            lambda w: w.op.desired(w.next_version(), {"telemetry": {"interval_s": 0.3}}, ["dev2"]),
            retain=True,
        ),
        SIGNATURE,
        no_report=True,
    ),
    Case(
        "config-trusted-keys",
        "dev2",
        pub(
            DESIRED,
            lambda w: signed_config({"updates": {"trusted_keys": {"attacker": str(w.op.attacker_pub)}}})(w),
            retain=True,
        ),
        r"updates\.trusted_keys",
    ),
    Case(
        "config-firmware-commands",
        "dev2",
        pub(
            DESIRED,
            signed_config({"updates": {"firmware": {"commands": {"install": ["/bin/sh", "-c", "id"]}}}}),
            retain=True,
        ),
        r"updates\.firmware\.commands",
    ),
    Case(
        "config-firmware-mode",
        "dev2",
        pub(DESIRED, signed_config({"updates": {"firmware": {"mode": "privileged"}}}), retain=True),
        r"updates\.firmware\.mode",
    ),
    Case(
        "config-firmware-health-command",
        "dev2",
        pub(
            DESIRED, signed_config({"updates": {"firmware": {"health_command": ["/bin/true"]}}}), retain=True
        ),
        r"updates\.firmware\.health_command",
    ),
    Case(
        "config-mqtt-host",
        "dev2",
        pub(DESIRED, signed_config({"mqtt": {"host": "broker.attacker.example"}}), retain=True),
        r"mqtt\.host",
    ),
    Case(
        "config-tls-insecure",
        "dev2",
        pub(DESIRED, signed_config({"mqtt": {"tls": {"insecure_skip_verify": True}}}), retain=True),
        r"mqtt\.tls",
    ),
    Case(
        "config-disables-remote-config",
        "dev2",
        pub(DESIRED, signed_config({"config": {"enabled": False}}), retain=True),
        r"config\.enabled",
    ),
    Case(
        "config-typo-file-path",
        "dev2",
        pub(
            DESIRED,
            signed_config({"monitor": {"battery_file": "/sys/class/power_suply/BAT0/capacity"}}),
            retain=True,
        ),
        r"monitor\.battery_file",
    ),
    Case(
        "config-typo-dir-path",
        "dev2",
        pub(DESIRED, signed_config({"monitor": {"thermal_dir": "/sys/class/thermall"}}), retain=True),
        r"monitor\.thermal_dir",
    ),
    Case(
        "config-for-another-device",
        "dev2",
        pub(DESIRED, signed_config({"telemetry": {"interval_s": 0.3}}, ["dev1"]), retain=True),
        r"not for this device|targets",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(world: World, case: Case) -> None:
    world.refused(
        case.device,
        lambda: case.act(world),
        case.reason,
        job=case.job,
        allow=case.allow,
        broker_log=case.broker_log,
        no_report=case.no_report,
        signed_reject=case.signed_reject,
    )
    if case.after is not None:
        case.after(world)


# --------------------------------------------------------------------------- the flood

FLOOD_MANIFESTS = 2000
FLOOD_CHUNKS = 200
FLOOD_RSS_MAX_KIB = 20 * 1024
FLOOD_EVENTS_MAX = 50


def test_flood(world: World, tmp_path: Path) -> None:
    """2,000 forged manifests, then 200 messages of 1 MiB on chunk topics, at a fresh agent: RSS
    grows by less than 20 MiB, at most 50 events go upstream, telemetry goes on, state dir unchanged."""
    agent = AgentProc(tmp_path / "dev3", "dev3", ["line3"], world.broker.port, world.op.pub).start()
    world.agents["dev3"] = agent
    try:
        world.wait_ready(agent)
        # warm up what any refusal loads (signature code, JSON paths), then measure from there
        forged = world.op.manifest("warm", devices=["dev3"])
        for i in range(20):
            world.publish(manifest_topic(f"warm-{i}", "dev3"), {**forged, "job": f"warm-{i}"})
            world.publish(f"edge/dev3/updates/warm-{i}/chunk/0", b"\x03" * MIB)
        world.wait_telemetry("dev3", world.seq("dev3"))
        time.sleep(2.0)
        base = agent.rss_kib()
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], agent.rss_kib())
                except (OSError, AssertionError):
                    return
                stop.wait(0.05)

        sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        sampler.start()
        mark = world.mark()

        def flood() -> None:
            c = world.observer.client
            for i in range(FLOOD_MANIFESTS):
                c.publish(
                    manifest_topic(f"forged-{i}", "dev3"), dumps({**forged, "job": f"forged-{i}"}), qos=1
                )
            last = None
            for i in range(FLOOD_CHUNKS):
                last = c.publish(f"edge/dev3/updates/orphan-{i % 7}/chunk/{i}", b"\x04" * MIB, qos=1)
            assert last is not None
            last.wait_for_publish(120)

        try:
            refusal = world.refused(
                "dev3", flood, r"signature|not signed|unknown key", job="forged-1999", timeout_s=60
            )
            # the agent has read everything once a refusal of the last manifest or later telemetry arrived;
            # give the tail of the chunk flood time to pass through it
            seq = world.seq("dev3")
            world.wait_telemetry("dev3", seq + 10, 60)
        finally:
            stop.set()
            sampler.join(5)
        growth = peak[0] - base
        events = world.events_since(mark, "dev3")
        print(
            f"flood: RSS base {base} KiB, peak {peak[0]} KiB, growth {growth} KiB; {len(events)} events; "
            f"evidence: {refusal.evidence[:200]}"
        )
        assert growth < FLOOD_RSS_MAX_KIB, f"RSS grew by {growth} KiB (base {base}, peak {peak[0]})"
        assert len(events) <= FLOOD_EVENTS_MAX, f"{len(events)} events for one flood"
        assert not (agent.state_dir / "updates").exists() or not any(
            p.name.startswith(("forged-", "orphan-")) for p in (agent.state_dir / "updates").iterdir()
        )
    finally:
        agent.stop()
