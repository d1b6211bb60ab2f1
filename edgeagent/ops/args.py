"""Flags the operator's verbs share; a light module (no MQTT import) since every parser loads it."""

from __future__ import annotations

import argparse
import os


def add_signing_broker_args(p: argparse.ArgumentParser) -> None:
    """The flags every verb that signs a message and sends it to devices takes (push, support)."""
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--key-id", required=True, help="the id devices know the public key by")
    p.add_argument("--broker", default=os.environ.get("EDGEAGENT_BROKER", "mqtt://127.0.0.1:1883"),
                   metavar="URL", help="mqtt:// or mqtts:// URL ($EDGEAGENT_BROKER)")
    p.add_argument("--ca-file", help="CA bundle for mqtts://")
    p.add_argument("--cert-file", help="client certificate for mqtts://")
    p.add_argument("--key-file", help="client key for mqtts://")
    p.add_argument("--prefix", default="edge", help="topic prefix (config mqtt.topic_prefix)")
