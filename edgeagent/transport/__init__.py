"""MQTT transport to the cloud broker with a store-and-forward spool (see DESIGN.md, wire protocol)."""

from edgeagent.transport.component import TransportComponent
from edgeagent.transport.outbox import SampleSink, SpoolOutbox
from edgeagent.transport.router import SessionRouter
from edgeagent.transport.session import ConnectFailed, Session
from edgeagent.transport.spool import Spool

__all__ = ["ConnectFailed", "SampleSink", "Session", "SessionRouter", "Spool", "SpoolOutbox",
           "TransportComponent"]
