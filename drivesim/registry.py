"""Model class registry: maps the `model_class` name stored in a checkpoint's config.json to a class.

A leaf: model modules import it and register into it; it imports no model. Whoever looks a class up by name
(`drivesim.training.checkpoint.load_model`) imports `drivesim.models` first, so every built-in model is registered.

A registered class takes its config dataclass as the only constructor argument and keeps it as `.config`,
so `drivesim.load(path)` can rebuild any model from its checkpoint without pickles or reflection on YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from drivesim.errors import CheckpointError

MODEL_REGISTRY: dict[str, type] = {}


def register_model(name: str, config_class: type) -> Callable[[type], type]:
    """Class decorator: register `cls` under `name` with its config dataclass `config_class`.

    Raises:
        ValueError: `name` is already registered to another class (a programming error).
    """

    def wrap(cls: type) -> type:
        existing = MODEL_REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"model class name {name!r} registered twice ({existing} and {cls})")
        cls.model_class_name = name
        cls.config_class = config_class
        MODEL_REGISTRY[name] = cls
        return cls

    return wrap


def get_model_class(name: str, source: str = "config.json") -> Any:
    """Return the class registered under `name` (the caller has imported the modules that register).

    Raises:
        CheckpointError: `name` is not a known model class (message names `source` and the field).
    """
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_REGISTRY)) or "none"
        raise CheckpointError(f"{source}: model_class: unknown model class {name!r} (known: {known})") from None
