"""The operator's tools: keygen, sign, push, fleet, simulate, bench-model, demo.

Never imported by the agent's runtime; registered with the `edgeagent` command through the
`edgeagent.commands` entry points (see pyproject.toml)."""
