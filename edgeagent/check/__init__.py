"""`edgeagent check`: the agent's self-check. files (static: what the config names, state dir, clock;
`check-config` runs these too), model, broker, sources (the per-kind table), system (systemd, installer),
run (order), result (lines and JSON), cli (the verb). Kept empty so that loading the verb stays cheap."""
