"""Core plumbing every runtime folder may use: config, errors, logging, sd_notify, atomic files,
signing, topics, task and retry helpers. It imports nothing else of ours."""
