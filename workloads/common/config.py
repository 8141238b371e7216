"""Typed job configs: one pydantic model per workload, loaded from YAML plus `a.b=value` overrides.

    python ray_jobs/dedup_exact.py --config ray_jobs/configs/dedup_exact/local.yaml output.path=/tmp/out

Every model forbids unknown keys, and the YAML file and the command-line overrides go through the
same validation, so a misspelt key or a wrong type fails before any Ray work starts, with a message
that names the key (and the nearest valid key, when there is one).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ConfigError",
    "StrictModel",
    "RayConfig",
    "InputConfig",
    "OutputConfig",
    "JobConfig",
    "DataJobConfig",
    "load_config",
    "apply_override",
    "describe_fields",
]

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or override that does not validate. The message names every bad key."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class RayConfig(StrictModel):
    address: str | None = Field(
        default=None,
        description="Ray cluster to join. Empty: $RAY_ADDRESS (set by `ray job submit`), else start local Ray.",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs for a local Ray started by the job (ignored on a cluster).",
    )
    object_store_memory_gb: float | None = Field(
        default=None, gt=0, description="Object store size for a local Ray started by the job."
    )
    data_progress_bars: bool = Field(default=True, description="Show Ray Data progress bars.")


class InputConfig(StrictModel):
    path: str = Field(
        description="A file, folder, glob or URI (s3://, gs://) of JSONL or Parquet documents."
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        default="auto",
        description="File format; `auto` goes by extension (.jsonl/.json[.gz|.zst], .parquet).",
    )
    text_field: str = Field(
        default="text", min_length=1, description="Field that holds the document text."
    )
    id_field: str | None = Field(
        default="id",
        description="Field that holds a document id. Records without one get `<file>:<line>` ids.",
    )
    max_records: int | None = Field(
        default=None, ge=1, description="Read at most this many records (for smoke runs)."
    )


class OutputConfig(StrictModel):
    path: str = Field(
        description="Output folder or URI. Each stage writes Parquet to its own sub-folder."
    )
    mode: Literal["resume", "overwrite"] = Field(
        default="resume",
        description="`resume` reuses finished stages whose config fingerprint matches; `overwrite` redoes all.",
    )
    keep_intermediate: bool = Field(
        default=True,
        description="Keep `_stages/` after success so a rerun with the same config is free.",
    )


class JobConfig(StrictModel):
    """Base of every job config."""

    ray: RayConfig = Field(default_factory=RayConfig)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where Ray runs or where output goes)."""
        return digest(self.fingerprint_payload())

    def fingerprint_payload(self) -> dict[str, Any]:
        """What `fingerprint` hashes; a job whose results depend on more than its own fields (a
        sweep's base config file) says so here."""
        return self.model_dump(mode="json", exclude={"ray", "output"})


def digest(payload: Any) -> str:
    """16 hex digits of SHA-256 over `payload` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class DataJobConfig(JobConfig):
    """Every data job names its input and output with these same two keys."""

    input: InputConfig
    output: OutputConfig


# --------------------------------------------------------------------------------------------
# Loading and overrides


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict. The value is parsed as YAML (so `3`, `true`, `[a, b]`
    and `null` have their YAML types) and validated later by the model, like the file itself."""
    if "=" not in override:
        raise ConfigError(
            f"override {override!r} is not of the form key=value (for example output.path=/tmp/out)"
        )
    dotted, _, raw = override.partition("=")
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {dotted}: value {raw!r} is not valid YAML: {exc}") from None
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"override {dotted}: {'.'.join(keys[: i + 1])} is a value ({child!r}), not a section"
            )
        node = child
    node[keys[-1]] = value


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The sub-model that holds the field at `loc` (for did-you-mean suggestions)."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc)
            if parent is not None:
                close = difflib.get_close_matches(str(loc[-1]), list(parent.model_fields), n=1)
                if close:
                    msg += f"; did you mean {'.'.join(str(p) for p in (*loc[:-1], close[0]))!r}?"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif loc:  # a rule over the whole config would echo all of it
            msg += f" (got {err.get('input')!r})"
        lines.append(f"  - {key}: {msg}")
    return "\n".join(lines)


def load_config(
    model: type[M], path: str | Path | None = None, overrides: list[str] | None = None
) -> M:
    """Load `path` (YAML), apply `overrides`, and validate against `model`.

    Raises ConfigError with one line per bad key.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping at the top level, not {type(loaded).__name__}"
            )
        tree = loaded
    for override in overrides or []:
        apply_override(tree, override)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, source)) from None


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, description) for every leaf field: the `--help` text of a job."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
            continue
        generic = typing.get_origin(ann) is not None
        type_name = (
            str(ann).replace("typing.", "") if generic else getattr(ann, "__name__", str(ann))
        )
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        rows.append((key, type_name, default, field.description or ""))
    return rows
