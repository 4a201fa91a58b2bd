"""The run's configuration in Dagster: one `ConfigurableResource` derived field by field from
`dapo_ops.config.dapo.DapoConfig`, so a field added there appears in the launchpad with no edit here.

Every asset of a run reads the same values, so they live in one place, the `training_config` resource
(`resources: {training_config: {config: {...}}}` in the launchpad), not once per op. `Literal` fields
become Dagster enums: the launchpad offers their choices and rejects any other value before a run starts.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import dagster as dg
import pydantic

from dapo_ops.config.dapo import DapoConfig
from dapo_ops.config.runconfig import RESOURCE_KEY

# Not a DapoConfig field: whether attention_metrics/attention_report re-analyse a stored round.
DAGSTER_ONLY_FIELDS: dict[str, tuple[type, Any]] = {"reanalysis": (bool, False)}


def _pydantic_fields(config_class: type) -> dict[str, tuple[Any, Any]]:
    """(type, default) per dataclass field; list defaults stay factories (no shared mutable default)."""
    hints = typing.get_type_hints(config_class)
    fields: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(config_class):
        if f.default_factory is not dataclasses.MISSING:
            default: Any = pydantic.Field(default_factory=f.default_factory)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            raise TypeError(f"DapoConfig.{f.name} has no default: every run field needs one for the launchpad")
        fields[f.name] = (hints[f.name], default)
    return fields


class _TrainingConfigBase(dg.ConfigurableResource):
    """The knobs of a training run, with TRL's names (fields: those of `DapoConfig`, plus `reanalysis`)."""

    def to_dapo(self) -> DapoConfig:
        """Validated library config (raises ValueError saying what to change), its default rewards following
        the dataset's answers (`rldata.config_for_dataset`)."""
        from dapo_ops.data.rl_loading import config_for_dataset

        return config_for_dataset(
            DapoConfig.from_dict({f.name: getattr(self, f.name) for f in dataclasses.fields(DapoConfig)}))

    @classmethod
    def from_dapo(cls, config: DapoConfig, **extra: object) -> TrainingConfig:
        return cls(**config.to_dict(), **extra)


def dagster_config_class(config_class: type, name: str = "TrainingConfig") -> type[_TrainingConfigBase]:
    """A `ConfigurableResource` with every field of the dataclass `config_class` (type and default) and
    `reanalysis`. Dagster turns each `Literal` into an enum of its choices."""
    return pydantic.create_model(name, __base__=_TrainingConfigBase, __module__=__name__,
                                 __doc__=_TrainingConfigBase.__doc__, **_pydantic_fields(config_class),
                                 **DAGSTER_ONLY_FIELDS)


TrainingConfig = dagster_config_class(DapoConfig)

ROUND_ASSETS = ("rollouts", "attention_metrics", "rewards", "policy_update", "attention_report", "training_report")
SETUP_ASSETS = ("dataset", "base_checkpoint")
REANALYSIS_ASSETS = ("attention_metrics", "attention_report")


def run_config_for(config: TrainingConfig) -> dg.RunConfig:
    """The run config of a run with `config` (what a sensor, a schedule or `make run` launches with)."""
    return dg.RunConfig(resources={RESOURCE_KEY: config})
