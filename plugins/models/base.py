"""Model plugin contract, ``build_model`` by name, and ``model.pt`` + ``model.json`` round trips.

Every built-in model is an ``nn.Sequential`` of coarse layers, so pipeline strategies can split it
by position and the composition of its children equals its forward.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from fedge.config import from_mapping, to_mapping
from fedge.errors import DataError
from fedge.registry import Kind, Registry
from fedge.rundir import atomic_path, atomic_write_text

__all__ = ["ModelConfig", "ModelPlugin", "build_model", "load_model", "model_spec", "save_model"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

# What built each model (plugin name, config, shapes), kept beside the module rather than set on it.
_SPECS: weakref.WeakKeyDictionary[nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Settings every model has."""

    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Parameter dtype."""
    seed: int = 0
    """Seed of the weight initialisation (the same seed gives the same initial model)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


class ModelPlugin(Protocol):
    """What a ``model`` plugin provides: a nested ``Config`` and ``build``."""

    Config: type

    @staticmethod
    def build(config: Any, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module: ...


def build_model(
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    registry: Registry[ModelPlugin] | None = None,
) -> nn.Module:
    """Build the model plugin ``name`` for inputs of ``input_shape`` (one sample) and ``num_classes``.

    Example::

        model = build_model("cnn", {"channels": [16, 32]}, input_shape=(1, 8, 8), num_classes=10)
    """
    registry = registry or Registry(Kind.MODEL)
    plugin = registry.get(name)
    config = from_mapping(plugin.Config, options or {}, where=f"model.{name}")
    # The weights come from the config's seed alone; the caller's global RNG stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(getattr(config, "seed", 0))
        model = plugin.build(config, input_shape=tuple(input_shape), num_classes=num_classes)
    model.to(getattr(config, "torch_dtype", torch.float32))
    _SPECS[model] = {
        "model": name,
        "config": to_mapping(config),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
    }
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """What built ``model``: plugin name, config, input shape and classes (and, after ``load_model``, what its
    ``model.json`` adds, e.g. the dataset). A copy; None for a module ``build_model`` did not make."""
    spec = _SPECS.get(model)
    return None if spec is None else dict(spec)


def save_model(model: nn.Module, directory: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``model.pt`` (a state_dict) and ``model.json`` (plugin name, config, shapes) atomically."""
    directory = Path(directory)
    spec = model_spec(model)
    if spec is None:
        raise ValueError("save_model needs a model made by build_model (it carries its plugin spec)")
    spec.update(extra or {})
    with atomic_path(directory / "model.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    atomic_write_text(directory / "model.json", json.dumps(spec, indent=2) + "\n")
    return directory / "model.pt"


def load_model(path: str | Path, *, registry: Registry[ModelPlugin] | None = None) -> nn.Module:
    """Rebuild a model from a run directory (``model.json`` + ``model.pt``) or a ``.pt`` beside a ``model.json``.

    Raises:
        DataError: the files are missing or do not match the model they name.
    """
    path = Path(path)
    weights = path / "model.pt" if path.is_dir() else path
    spec_file = (path if path.is_dir() else path.parent) / "model.json"
    if not weights.is_file():
        raise DataError(f"no model weights at {str(weights)!r}; pass a run directory holding model.pt and model.json")
    if not spec_file.is_file():
        raise DataError(f"no model.json beside {str(weights)!r}; it names the model plugin and its config")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        model = build_model(
            spec["model"],
            spec.get("config", {}),
            input_shape=tuple(spec["input_shape"]),
            num_classes=int(spec["num_classes"]),
            registry=registry,
        )
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{str(spec_file)!r} is not a fedge model.json: {err}") from err
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - random bytes reach unpickling and fail in any way
        state = err
    if not isinstance(state, Mapping):
        # Never torch's own advice here: it suggests weights_only=False, which would run any code the file holds.
        raise DataError(
            f"cannot load weights {str(weights)!r}: expected a torch state_dict of tensors (as fedge fl run and "
            "fedge train write model.pt), found a corrupt file or pickled objects fedge will not unpickle; "
            "re-save it with torch.save(model.state_dict(), PATH)"
        ) from (state if isinstance(state, BaseException) else None)
    try:
        model.load_state_dict(state)
    except Exception as err:  # torch raises RuntimeError for missing, unexpected or mis-shaped keys
        raise DataError(f"cannot load weights {str(weights)!r} into model {spec['model']!r}: {err}") from err
    built = _SPECS[model]
    built.update({k: v for k, v in spec.items() if k not in built})
    return model
