"""Operator side: collect, store, export and watch the telemetry of a fleet (never imported by the agent)."""
