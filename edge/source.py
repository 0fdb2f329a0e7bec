"""The model ``fedge edge export`` starts from: a fedge run directory, a ``.pt`` beside a ``model.json``, a
``.keras`` file or a SavedModel directory; and its outputs on dataset samples, to score the export against."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedge.errors import DataError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["SourceModel", "load_source", "run_source", "source_kind", "to_layout"]


@dataclass(frozen=True, slots=True)
class SourceModel:
    """The model to export: a torch module or a Keras path, what it is, and the dataset it was trained on."""

    model: object
    kind: str
    """``torch`` or ``keras``."""
    description: str
    dataset: str | None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    """What model.json says the dataset was loaded with (``fedge fl run`` writes ``dataset_options``)."""
    spec: dict[str, Any] = field(default_factory=dict)
    """model.json of a torch model: plugin name, its config, input shape, number of classes."""


def _load_torch(path: Path) -> Any:
    from fedge.plugins.models import load_model

    try:
        return load_model(path)
    except DataError as err:
        first = str(err).splitlines()[0].rstrip(" :.")
        # torch's weights-only refusal advises weights_only=False, which would run any code the file holds.
        if isinstance(err.__cause__, pickle.UnpicklingError) or "weights_only" in first:
            weights = path / "model.pt" if path.is_dir() else path
            raise DataError(
                f"cannot load weights {str(weights)!r}: expected a torch state_dict of tensors (as fedge fl run and "
                "fedge train write model.pt), found a corrupt file or pickled objects fedge will not unpickle; "
                "re-save it with torch.save(model.state_dict(), PATH)"
            ) from err
        raise DataError(first[:400]) from err


def source_kind(path: str | Path) -> str:
    """``torch`` or ``keras``: which converter MODEL needs, from its file names alone (nothing is loaded).

    Raises:
        DataError: missing or not a model fedge can export.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(
            f"no model at {str(path)!r}; pass a fedge run directory, a .pt beside model.json, or a .keras file"
        )
    if (path.is_dir() and (path / "model.pt").is_file()) or (path.is_file() and path.suffix == ".pt"):
        return "torch"
    if (path.is_dir() and (path / "saved_model.pb").is_file()) or (path.is_file() and path.suffix == ".keras"):
        return "keras"
    raise DataError(
        f"{str(path)!r} is not a model fedge can export: expected a run directory with model.pt + model.json, "
        "a .pt beside a model.json, a .keras file or a SavedModel directory"
    )


def load_source(path: str | Path) -> SourceModel:
    """A fedge run directory, a ``.pt`` beside a ``model.json``, a ``.keras`` file or a SavedModel directory.

    Raises:
        DataError: missing, unrecognised or corrupt.
    """
    path = Path(path)
    if source_kind(path) == "keras":
        return SourceModel(model=str(path), kind="keras", description=f"Keras model {path.name}", dataset=None)
    from fedge.plugins.models import model_spec

    model = _load_torch(path)
    spec = model_spec(model)
    assert spec is not None  # load_model made it
    return SourceModel(
        model=model,
        kind="torch",
        description=f"fedge model {spec['model']!r}",
        dataset=spec.get("dataset"),
        dataset_options=dict(spec.get("dataset_options") or {}),
        spec=spec,
    )


def run_source(src: SourceModel, x: np.ndarray, *, dataset: str = "the dataset") -> tuple[np.ndarray, tuple[int, ...]]:
    """The source model's outputs on dataset samples ``x`` (channels first), and the sample shape it takes.

    Raises:
        DataError: the samples do not have the shape the model was built for.
    """
    if src.kind == "keras":
        return _keras_predict(str(src.model), x)
    import torch

    shape = tuple(src.spec["input_shape"])
    if tuple(x.shape[1:]) != shape:
        raise DataError(
            f"{dataset} has samples of shape {tuple(x.shape[1:])}, the model was built for {shape}; "
            "pass the --dataset it was trained on"
        )
    src.model.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        return src.model(torch.as_tensor(x)).numpy(), shape  # type: ignore[operator]


def _keras_load(path: str) -> tuple[Any, tuple[int, ...]]:
    """A Keras model (or a SavedModel's serving function) and the sample shape it takes."""
    from fedge.edge.runtimes import captured_stderr

    p = Path(path)
    # TensorFlow's C++ start-up lines go to fd 2 whatever the log level; they are not news to a user.
    with captured_stderr():
        try:
            if p.is_dir():
                import tensorflow as tf

                fn = tf.saved_model.load(str(p)).signatures["serving_default"]
                shape = tuple(int(d) for d in next(iter(fn.structured_input_signature[1].values())).shape[1:])
                return fn, shape
            import keras

            model = keras.models.load_model(p, compile=False)
            return model, tuple(int(d) for d in model.inputs[0].shape[1:])
        except Exception as err:
            msg = f"cannot load the Keras model {str(p)!r} (corrupt?): {type(err).__name__}: {str(err)[:200]}"
            raise DataError(msg.splitlines()[0]) from err


def _keras_predict(path: str, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    import numpy as np

    from fedge.edge.runtimes import captured_stderr

    model, shape = _keras_load(path)
    with captured_stderr():
        if Path(path).is_dir():
            import tensorflow as tf

            out = next(iter(model(tf.constant(to_layout(x, shape))).values()))
        else:
            out = model.predict(to_layout(x, shape), verbose=0)
    return np.asarray(out), shape


def to_layout(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Dataset samples (channels first, as fedge's datasets give them) in a model's input layout."""
    import numpy as np

    if tuple(x.shape[1:]) == shape:
        return x
    if x.ndim == 4 and tuple(np.moveaxis(x, 1, -1).shape[1:]) == shape:  # NCHW -> NHWC for Keras
        return np.ascontiguousarray(np.moveaxis(x, 1, -1))
    if int(np.prod(x.shape[1:])) == int(np.prod(shape)):
        return x.reshape(len(x), *shape)
    raise DataError(f"the dataset's samples have shape {tuple(x.shape[1:])}, the model takes {shape}; pass --dataset")
