"""The seeded fault schedule: pure, so a failing run is repeated exactly with the same `--seed`.

The run is made of cycles (one in `--quick`, one per ~75 s in the full run). Each cycle pushes the
same update cases (good and bad, some with a kill -9 mid-download or mid-install) at fixed moments
and spreads the faults over fixed slots, in an order, with targets and strengths drawn from the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

CYCLE_S = 75.0
FAULT_SLOTS_S = (4.0, 10.0, 18.0, 26.0, 30.0, 44.0, 50.0, 58.0, 64.0, 68.0)
# the first cycle's order: the backwards clock jump gets a quiet stretch after it (nothing else
# then disturbs delivery, so a pause in telemetry is the jump's doing)
FAULTS = ("link-flaky", "clock-forward", "broker-restart", "kill9", "clock-back", "link-stall",
          "disk-full", "link-down", "kill9", "broker-restart")


@dataclass(frozen=True)
class Step:
    at_s: float
    action: str  # broker-restart | kill9 | link | disk-full | clock-jump | update
    target: str = ""  # device id ("" for the broker / every link)
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Roles:
    """Which agent plays which part (the first three; any further agents only run and get killed)."""

    agents: tuple[str, ...]

    @property
    def models(self) -> str:  # inference on: model updates
        return self.agents[0]

    @property
    def firmware(self) -> str:  # good and health-failing firmware
        return self.agents[1]

    @property
    def victim(self) -> str:  # small disk, wall-clock jumps, an install that fails
        return self.agents[2]


def updates_for_cycle(c: int, roles: Roles, rng: random.Random) -> list[Step]:
    o = c * CYCLE_S
    # a good model spends seconds installing (validation, then probation on real windows), a NaN one
    # is refused within milliseconds: the mid-install kill goes to the good one
    kill_model = "mid-install" if c % 2 == 0 else "mid-download"
    kill_nan = ""
    kill_fw = "mid-download" if c % 2 == 0 else ""
    return [
        Step(o + 2, "update", roles.models, {"case": "model-good", "version": f"1.{c * 10 + 1}.0",
                                             "kill": kill_model}),
        Step(o + 6, "update", roles.firmware, {"case": "fw-good", "version": f"2.{c * 10 + 1}.0",
                                               "kill": kill_fw}),
        Step(o + 22, "update", roles.models, {"case": "model-nan", "version": f"1.{c * 10 + 2}.0",
                                              "kill": kill_nan}),
        Step(o + 31, "update", rng.choice(roles.agents[:3]), {"case": "bad-signature",
                                                              "version": f"9.{c}.0", "kill": ""}),
        Step(o + 40, "update", roles.victim, {"case": "fw-fail-install", "version": f"2.{c * 10 + 2}.0",
                                              "kill": ""}),
        Step(o + 42, "update", roles.models, {"case": "version-rollback", "version": "0.5.0", "kill": ""}),
        Step(o + 52, "update", roles.firmware, {"case": "fw-fail-health", "version": f"2.{c * 10 + 3}.0",
                                                "kill": ""}),
        Step(o + 56, "update", roles.models, {"case": "sha-mismatch", "version": f"1.{c * 10 + 3}.0",
                                              "kill": ""}),
    ]


def fault_step(name: str, at_s: float, roles: Roles, rng: random.Random) -> Step:
    if name == "link-flaky":
        return Step(at_s, "link", "", {"mode": "flaky", "duration_s": round(rng.uniform(8, 14), 1),
                                       "latency_ms": rng.choice((30, 60, 120)),
                                       "jitter_ms": rng.choice((10, 40)),
                                       "reset_prob": rng.choice((0.005, 0.01, 0.02))})
    if name == "link-stall":
        return Step(at_s, "link", "", {"mode": "stall", "duration_s": round(rng.uniform(3, 6), 1)})
    if name == "link-down":
        return Step(at_s, "link", "", {"mode": "down", "duration_s": round(rng.uniform(2, 5), 1)})
    if name == "broker-restart":
        return Step(at_s, "broker-restart", "", {"down_s": round(rng.uniform(1, 4), 1)})
    if name == "kill9":
        return Step(at_s, "kill9", rng.choice(roles.agents), {"down_s": round(rng.uniform(0.5, 3), 1)})
    if name == "disk-full":
        return Step(at_s, "disk-full", roles.victim, {"duration_s": round(rng.uniform(6, 10), 1)})
    if name == "clock-forward":
        delta = float(rng.choice((3600, 7200, 6 * 3600)))
        return Step(at_s, "clock-jump", roles.victim, {"delta_s": delta})
    if name == "clock-back":
        return Step(at_s, "clock-jump", roles.victim, {"delta_s": "back"})  # undo the forward jump
    raise ValueError(name)


def make_schedule(seed: int, agents: list[str], cycles: int) -> list[Step]:
    if len(agents) < 3:
        raise ValueError("the trial needs at least 3 agents")
    rng = random.Random(seed)
    roles = Roles(tuple(agents))
    steps: list[Step] = []
    for c in range(cycles):
        order = list(FAULTS)
        if c > 0:  # the first cycle in the documented order, later ones shuffled
            rng.shuffle(order)
            fwd, back = order.index("clock-forward"), order.index("clock-back")
            if fwd > back:  # forward first, then back (both directions, net zero)
                order[fwd], order[back] = order[back], order[fwd]
        for slot, name in zip(FAULT_SLOTS_S, order, strict=True):
            at = c * CYCLE_S + slot + rng.uniform(-1.5, 1.5)
            steps.append(fault_step(name, round(max(0.5, at), 2), roles, rng))
        steps.extend(updates_for_cycle(c, roles, rng))
    return sorted(steps, key=lambda s: s.at_s)
