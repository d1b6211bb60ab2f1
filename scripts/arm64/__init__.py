"""The parts of scripts/test-arm64: roots (build, cache, mounts), wheelcheck, board (steps), parity."""
