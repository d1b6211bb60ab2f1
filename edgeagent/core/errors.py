"""One exception hierarchy: every error the agent raises on purpose derives from EdgeAgentError."""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every deliberate edgeagent error."""


class ConfigError(EdgeAgentError):
    """A config file or layer is invalid; `errors` holds every problem found, each with its key path."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.errors))


class ProtocolError(EdgeAgentError):
    """An MQTT payload does not follow the wire protocol (malformed JSON, missing field, wrong type)."""

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"{topic}: {reason}")


class SignatureInvalid(EdgeAgentError):
    """A signed message failed verification (unknown key, bad signature, unsigned)."""

    def __init__(self, reason: str, key_id: str | None = None) -> None:
        self.reason = reason
        self.key_id = key_id
        super().__init__(reason)


class SensorError(EdgeAgentError):
    """A sensor source cannot be used (missing file, no valid rows, bad settings); `source` names it."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class SensorPayloadError(SensorError):
    """One sensor message or CSV row is malformed; it is dropped and counted, the source keeps running."""


class ModelMetaError(EdgeAgentError):
    """A model.toml is missing, malformed or inconsistent; `path` names the file, `reason` the key."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class FleetStoreError(EdgeAgentError):
    """The fleet collector's database is missing, unreadable or not a fleet database."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ManifestRejected(EdgeAgentError):
    """An update manifest (or cancel) failed parsing, its signature, or a check; `reason` says which."""

    def __init__(self, reason: str, job: str | None = None) -> None:
        self.reason = reason
        self.job = job
        super().__init__(reason)


class ChunkRejected(EdgeAgentError):
    """One update chunk is out of range, the wrong size or fails its sha256; it is dropped, not written."""

    def __init__(self, job: str, index: int, reason: str) -> None:
        self.job = job
        self.index = index
        self.reason = reason
        super().__init__(f"job {job} chunk {index}: {reason}")


class BundleRejected(EdgeAgentError):
    """A model bundle is unsafe to extract (absolute path, `..`, link, too large unpacked)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class GateClosed(EdgeAgentError):
    """The device context forbids applying an update now; `failures` lists each gate with its values."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(self.failures))


class ModelRejected(EdgeAgentError):
    """A new model was refused before it became active; the previous model keeps serving."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ModelRolledBack(EdgeAgentError):
    """A new model failed during probation; the previous model is active again."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RuntimeUnavailable(EdgeAgentError):
    """No usable TFLite runtime (or the configured delegate library) on this machine."""

    def __init__(self, runtime: str, reason: str) -> None:
        self.runtime = runtime
        self.reason = reason
        super().__init__(f"{runtime}: {reason}")


class ModelLoadError(EdgeAgentError):
    """A .tflite file cannot be loaded or allocated; `op` names the missing operator when known."""

    def __init__(self, path: str, reason: str, op: str | None = None, runtime: str = "") -> None:
        self.path = path
        self.reason = reason
        self.op = op
        self.runtime = runtime
        super().__init__(f"{path}: {reason}")


class SpoolError(EdgeAgentError):
    """The store-and-forward spool cannot be opened or written (`path` names the file)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"spool {path}: {reason}")


class ExprError(EdgeAgentError):
    """A rule expression does not parse or type-check; `column` (1-based) points at the problem."""

    def __init__(self, reason: str, column: int, text: str = "") -> None:
        self.reason = reason
        self.column = column
        self.text = text
        super().__init__(f"{reason} at column {column}")


class ExprEvalError(EdgeAgentError):
    """A rule expression could not be evaluated on this sample (absent name, division by zero, ...);
    the condition counts as false. `name` is set when the cause is an absent value."""

    def __init__(self, reason: str, name: str | None = None) -> None:
        self.reason = reason
        self.name = name
        super().__init__(reason)


class RemoteConfigRejected(EdgeAgentError):
    """A desired config was refused (unsigned, bad signature, malformed, invalid, old version)."""

    def __init__(self, reason: str, version: int = 0) -> None:
        self.reason = reason
        self.version = version
        super().__init__(reason)


class InstallerCommandError(EdgeAgentError):
    """An installer preset, op or per-op override cannot make a command line."""

    def __init__(self, message: str, *, preset: str | None = None, op: str | None = None) -> None:
        self.preset = preset
        self.op = op
        super().__init__(message)


class InstallerConfigError(EdgeAgentError):
    """installer.toml is missing, unsafe (writable by others) or invalid; `path` names it."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class RequestRejected(EdgeAgentError):
    """A privileged-step request is malformed or names an artifact outside what the agent may name."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        self.reason = reason
        self.request_id = request_id
        super().__init__(reason)
