"""Run config files: a YAML mapping of `DapoConfig` fields (TRL's `--config`), plus `--set NAME=VALUE`.

    python -m pipelines.cli run --config configs/runs/qwen2_5_vl_3b_aokvqa.yaml --set learning_rate=1e-6

Values are read as YAML and checked against the field's type before anything starts; an unknown key, a
value of the wrong type or a value `DapoConfig.validate` refuses fails with the key and the file named.
The same keys paste under `resources: {training_config: {config: ...}}` in the Dagster launchpad
(`dagster_run_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pydantic
import yaml

from dapo_ops.config.dapo import DapoConfig

RESOURCE_KEY = "training_config"


class RunConfigError(ValueError):
    """A run config file or override that cannot become a `DapoConfig` (the message names key and source)."""


@cache
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(DapoConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(DapoConfig)}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a run config file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"run config {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise RunConfigError(f"run config {path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise RunConfigError(f"run config {path} must be a mapping of config fields, not {type(values).__name__}")
    return values


def coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Each value converted to its field's type (YAML reads `5e-4` as a string; pydantic makes it 0.0005).
    Unknown keys and values of the wrong type are reported together, naming `source`."""
    types = _field_types()
    problems: list[str] = []
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            close = difflib.get_close_matches(str(key), types, n=1)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{key}: unknown key{hint}")
            continue
        if typing.get_origin(types[key]) is typing.Literal and isinstance(value, str):
            out[key] = value  # DapoConfig.validate names the choices ("... is unknown; use one of ...")
            continue
        try:
            out[key] = pydantic.TypeAdapter(types[key]).validate_python(value)
        except pydantic.ValidationError as error:
            reason = "; ".join(e["msg"] for e in error.errors())
            problems.append(f"{key}={value!r}: {reason} (expected {_type_name(types[key])})")
    if problems:
        raise RunConfigError(f"{source}:\n  - " + "\n  - ".join(problems))
    return out


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_override(item: str) -> tuple[str, Any]:
    """`NAME=VALUE` of `--set`, the value read as YAML (`1e-4`, `true`, `[a, b]`, `null`)."""
    name, sep, raw = item.partition("=")
    if not sep or not name:
        raise RunConfigError(f"--set {item}: expected NAME=VALUE, e.g. --set learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    # A field typed str keeps the text as written (`--set run_name=007` is "007", not 7).
    if _field_types().get(name) is str:
        value = raw
    return name, value


def load_run_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                    flags: Mapping[str, Any] | None = None) -> DapoConfig:
    """Defaults < the file < `flags` (the CLI's explicit options) < `--set` overrides, validated; every
    problem is reported with the file (or the override) it came from."""
    values: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = f"run config {path}"
        values.update(coerce(read_yaml(path), source))
    values.update(flags or {})
    overrides = list(overrides)
    if overrides:
        values.update(coerce(dict(parse_override(item) for item in overrides), "--set " + " ".join(overrides)))
    try:
        return DapoConfig(**values)
    except (ValueError, TypeError) as error:
        extra = " with --set " + " ".join(overrides) if overrides else ""
        raise RunConfigError(f"{source}{extra}: {error}") from None


def dagster_run_config(config: DapoConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The Dagster run config of `config` for the launchpad: the YAML's keys under the one resource."""
    values = config.to_dict() if isinstance(config, DapoConfig) else dict(config)
    return {"resources": {RESOURCE_KEY: {"config": values}}}


def launchpad_yaml(path: str | Path) -> str:
    """A run config file as launchpad YAML: only the keys the file sets (the rest keep their defaults)."""
    values = coerce(read_yaml(path), f"run config {path}")
    return yaml.safe_dump(dagster_run_config(values), sort_keys=False)
