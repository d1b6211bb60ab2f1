"""edgeagent: one asyncio process per board that monitors, infers, updates and reports."""

__version__ = "0.1.0"
