"""Field trial harness: fault proxy, fault schedule, fleet of real agent processes."""
