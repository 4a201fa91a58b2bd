"""The names a config may use for plug-ins: reward functions (`reward_funcs`) and rollout engines (`use_vllm`).

A built-in registers itself where it is defined (`@register_reward` in a module of `dapo_ops.rl`,
`@register_engine` in one of `dapo_ops.rollout`); the registry finds the built-ins by importing those packages'
modules on first look-up, by name, as a user's own reward is found by its import path. So the config layer
validates names without importing the layers above it, and adding a reward or an engine is one module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, Protocol


class SelectsEngine(Protocol):
    """What selects an engine: a `DapoConfig` (typed structurally, as `dapo` imports this module)."""

    use_vllm: bool


RewardFunction = Callable[..., list[float | None]]

REWARD_FUNCTIONS: dict[str, RewardFunction] = {}
# The rewards of the default configuration, in the order of its `reward_weights` and of the logged metrics.
DEFAULT_REWARD_FUNCS: tuple[str, ...] = ("mc_idx_reward", "think_format_reward", "mdi_reward")

HF_ENGINE = "hf"
VLLM_ENGINE = "vllm"
# Engine name -> its class, taking `(config, policy)`.
ENGINES: dict[str, type] = {}

# Where the built-ins of each kind are defined (every module of the package is imported once, on first look-up).
_BUILTIN_PACKAGES = {"reward": "dapo_ops.rl", "engine": "dapo_ops.rollout"}
_LOADED: set[str] = set()


def _load_builtins(kind: str) -> None:
    if kind in _LOADED:
        return
    _LOADED.add(kind)
    package = importlib.import_module(_BUILTIN_PACKAGES[kind])
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def register_reward(
    func: RewardFunction | None = None, *, name: str | None = None, needs_attention: bool = False
) -> Any:
    """Add a reward to `REWARD_FUNCTIONS` under `name` (default: its `__name__`); usable as a decorator.

    `needs_attention=True` marks a reward that reads the teacher-forced pass's columns (`mdi`, `attn/...`):
    dynamic-sampling refill, which scores before that pass, leaves it out.
    """

    def add(f: RewardFunction) -> RewardFunction:
        f.needs_attention = needs_attention  # type: ignore[attr-defined]
        REWARD_FUNCTIONS[name or f.__name__] = f
        return f

    return add(func) if func is not None else add


def reward_name(entry: str) -> str:
    """The name a `reward_funcs` entry is logged under: the registry name, or the attribute of an import path
    (`my_pkg.rewards:length_penalty` -> `length_penalty`, as TRL names a reward by its `__name__`)."""
    return entry.rpartition(":")[2].rpartition(".")[2] if ":" in entry else entry


def resolve_reward(entry: str) -> RewardFunction:
    """The function a `reward_funcs` entry names: a registered name, or `module.path:attribute` to import.

    Raises ValueError naming the entry when it is neither, cannot be imported, or is not callable.
    """
    if entry not in REWARD_FUNCTIONS:
        _load_builtins("reward")
    if entry in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[entry]
    module_name, sep, attribute = entry.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"reward {entry!r} is not a built-in reward ({', '.join(REWARD_FUNCTIONS)}) nor an import path "
            f"'module.path:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward {entry!r}: cannot import module {module_name!r} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward {entry!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward {entry!r} is a {type(target).__name__}, not a callable reward function")
    return target


def needs_attention(func: RewardFunction) -> bool:
    """True when `func` reads the teacher-forced pass's columns (see `register_reward`)."""
    return bool(getattr(func, "needs_attention", False))


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: the rollout engine selected as `name` (see `engine_name`)."""

    def add(cls: type) -> type:
        ENGINES[name] = cls
        return cls

    return add


def engine_name(config: SelectsEngine) -> str:
    """The engine a config selects, by TRL's switch (`use_vllm`; `vllm_mode` is the vLLM engine's own)."""
    return VLLM_ENGINE if config.use_vllm else HF_ENGINE


def engine_class(name: str) -> type | None:
    """The registered engine class of `name`, None when this install has none."""
    if name not in ENGINES:
        _load_builtins("engine")
    return ENGINES.get(name)


def engine_problem(config: SelectsEngine) -> str | None:
    """Why the config's engine cannot be built, for `DapoConfig.validate`; None when it can."""
    name = engine_name(config)
    if engine_class(name) is not None:
        return None
    return (f"use_vllm={config.use_vllm} selects the {name!r} rollout engine, which is not implemented in this "
            f"install (registered engines: {', '.join(sorted(ENGINES))}); set use_vllm=false, or add an engine "
            f"module to dapo_ops/rollout/ with @register_engine({name!r})")
