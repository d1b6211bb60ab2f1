"""Support bundles: what a technician or an operator needs to diagnose a board, secrets left out."""

from edgeagent.support.bundle import BundleResult, build_bundle

__all__ = ["BundleResult", "build_bundle"]
