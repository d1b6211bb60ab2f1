"""Signed model and firmware updates over MQTT: manifest, transfer, bundle, jobs, installers."""

from edgeagent.updates.component import UpdatesComponent
from edgeagent.updates.seams import ModelInstaller

__all__ = ["ModelInstaller", "UpdatesComponent"]
