"""The seams the updates component calls through: owned here, implemented structurally elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgeagent.core.shadow_spec import ShadowOutcome, ShadowSpec


class ModelInstaller(Protocol):
    """The inference component's side of a model update (the updates component calls it)."""

    async def install(self, staged_dir: Path, name: str, version: str, job: str,
                      pipeline: str | None = None) -> None:
        """Copy `staged_dir` (model.tflite + optional model.toml, already verified and extracted
        safely) into the model store, validate it in the background, hot-swap it and keep it on
        probation until it has served real windows. Returns when it is the active model and has
        served them; raises ModelRejected (never activated) or ModelRolledBack (failed in
        probation, previous model active again), both carrying `.reason`. `pipeline`: the manifest's,
        which pipeline's model this replaces (None: the one serving `name`, else the first)."""

    def installed_version(self, name: str, pipeline: str | None = None) -> str | None:
        """The active version of model `name` (in `pipeline`, as for install), or None."""
    async def shadow(self, staged_dir: Path, name: str, version: str, job: str, spec: ShadowSpec,
                     report: Callable[[dict[str, Any]], None], pipeline: str | None = None) -> ShadowOutcome:
        """Run the candidate in `staged_dir` beside the serving model of its pipeline on `spec.windows`
        live windows, without swapping anything, and judge it. `report` is called with the figures
        as they come. Raises ModelRejected (`.reason`) if the candidate does not even validate."""
