"""Signed model and firmware updates over MQTT: manifest, transfer, bundle, jobs, installers."""

from edgeagent.updates.component import UpdatesComponent

__all__ = ["UpdatesComponent"]
