"""Builds the updates component from the Hub while the rest of the agent still wires through it.

Temporary: each adapter reads the Hub at call time (the transport replaces `hub.outbox` and
`hub.router` when it enters; remote config replaces `hub.config`), so behaviour is what it was.
Delete this module with edgeagent/core/hub.py once agent.py hands out the live.py objects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeagent.core.config import Config
from edgeagent.core.errors import ModelRejected
from edgeagent.core.hub import Hub
from edgeagent.core.live import Handler, LiveConfig, Metrics
from edgeagent.core.protocol import Topics
from edgeagent.updates.component import UpdatesComponent
from edgeagent.updates.seams import ModelInstaller


class HubLive(LiveConfig):
    """LiveConfig over the Hub's config, busy reasons, slowdown and `changed` event."""

    def __init__(self, hub: Hub) -> None:  # no super().__init__: every attribute is the Hub's
        self.hub = hub

    # read-only views of the Hub's attributes: nothing writes them through this class
    @property
    def config(self) -> Config:  # type: ignore[override]
        return self.hub.config

    @property
    def topics(self) -> Topics:  # type: ignore[override]
        return self.hub.topics

    @property
    def busy(self) -> dict[str, str]:  # type: ignore[override]
        return self.hub.busy

    @property
    def slowdown(self) -> dict[str, float]:  # type: ignore[override]
        return self.hub.slowdown

    @property
    def changed(self) -> asyncio.Event:  # type: ignore[override]
        return self.hub.changed

    def notify_changed(self) -> None:
        self.hub.notify_changed()

    def replace(self, config: Config) -> None:
        self.hub.replace_config(config)

    def set_busy(self, source: str, reason: str | None) -> None:
        self.hub.set_busy(source, reason)


class HubMetrics(Metrics):
    def __init__(self, hub: Hub) -> None:  # no super().__init__: the samples are the Hub's
        self.hub = hub

    @property
    def latest(self) -> dict[str, Any]:  # type: ignore[override]
        return self.hub.metrics

    @property
    def ts(self) -> float:  # type: ignore[override]
        return self.hub.metrics_ts

    def publish(self, metrics: dict[str, Any], ts: float | None = None) -> None:
        self.hub.publish_metrics(metrics, ts)

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        self.hub.on_metrics(listener)


class HubOutbox:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def emit_event(self, kind: str, severity: str, message: str,
                   data: dict[str, Any] | None = None) -> None:
        self.hub.outbox.emit_event(kind, severity, message, data)

    def put_state(self, topic: str, payload: dict[str, Any]) -> None:
        self.hub.outbox.put_state(topic, payload)

    def put_message(self, topic: str, payload: dict[str, Any]) -> None:
        self.hub.outbox.put_message(topic, payload)


class HubRouter:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        self.hub.router.subscribe(topic_filter, handler)

    @property
    def connected(self) -> bool:
        return self.hub.router.connected

    async def wait_connected(self) -> None:
        await self.hub.router.wait_connected()

    @property
    def rtt_ms(self) -> float | None:
        """The transport's measured broker round trip (the network gate's input)."""
        mqtt = self.hub.providers.get("mqtt")
        try:
            value = mqtt().get("rtt_ms") if mqtt is not None else None
        except Exception:  # a provider that fails reads as "unknown", as it always did
            return None
        return float(value) if isinstance(value, (int, float)) else None


class HubModelInstaller:
    """Whatever installer the inference component registers on entering (after we are built)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def installed_version(self, name: str) -> str | None:
        inst = self.hub.model_installer
        return inst.installed_version(name) if inst is not None else None

    async def install(self, staged_dir: Path, name: str, version: str, job: str) -> None:
        inst = self.hub.model_installer
        if inst is None:
            raise ModelRejected("inference is not running")
        await inst.install(staged_dir, name, version, job)


def updates_from_hub(hub: Hub, model_installer: ModelInstaller | None = None,
                     inference_section: Callable[[], dict[str, Any]] | None = None,
                     **seams: Any) -> UpdatesComponent:
    """The component over Hub adapters; its sections are registered as the providers they were."""
    if model_installer is None and hub.config.inference.enabled:
        model_installer = HubModelInstaller(hub)
    if inference_section is None:
        def inference_section() -> dict[str, Any]:
            return hub.sections().get("inference", {})
    comp = UpdatesComponent(HubLive(hub), HubMetrics(hub), HubOutbox(hub), HubRouter(hub), model_installer,
                            inference_section, **seams)
    hub.providers["updates"] = comp.section
    hub.providers["firmware"] = comp.firmware_section
    return comp
