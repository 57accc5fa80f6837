"""Keras Applications bases: names, options, ImageNet weights and each family's preprocessing."""

from __future__ import annotations

import difflib
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import keras
import numpy as np

from conf.errors import ExpectedError
from tasks.model.compute import layer_precision
from tasks.runtime.keras_internals import file_matches_hash, weights_fetched_through

APPLICATIONS_DOCS = "https://keras.io/api/applications/"

# Constructor arguments the pipeline sets itself; a value in base.options would silently break
# the classifier (a second pooling, a top, or inputs the preprocessing layer does not expect).
_RESERVED_OPTIONS = {
    "include_top": "the classifier adds its own head",
    "weights": "set base.weights instead",
    "input_shape": "set data.image_size instead",
    "input_tensor": "the classifier creates the input",
    "pooling": "set head.pooling instead",
    "classes": "the number of classes comes from the data",
    "classifier_activation": "the classifier adds its own head",
    "include_preprocessing": (
        "the classifier feeds raw pixels and relies on the model's built-in normalisation"
    ),
}


class UnknownArchitectureError(ExpectedError, ValueError):
    """base.architecture names no Keras Applications model."""


class WeightsNotFoundError(ExpectedError, FileNotFoundError):
    """The weights file for the base is neither where it was looked for nor downloadable."""


class BaseOptionsError(ExpectedError, ValueError):
    """base.options or data.image_size that the architecture's constructor rejects."""


class PreprocessingNotAffineError(ExpectedError, ValueError):
    """A family's preprocess_input is not per-pixel affine, so a Dense layer cannot hold it."""


# --- architectures -------------------------------------------------------------------------------


def architecture_names() -> list[str]:
    """Every Keras Applications constructor name usable as a base, e.g. "MobileNetV2"."""
    return [
        name
        for name in dir(keras.applications)
        if name[:1].isupper()
        and callable(getattr(keras.applications, name))
        and isinstance(
            getattr(keras.applications, _family_name(getattr(keras.applications, name)), None),
            ModuleType,
        )
    ]


def _family_name(constructor: Any) -> str:
    """The name of the module that defines `constructor`, e.g. ResNet50 -> "resnet"; the public
    keras.applications module of that name holds its preprocess_input."""
    return getattr(constructor, "__module__", "").rpartition(".")[2]


def check_architecture(name: str) -> None:
    """Raise UnknownArchitectureError unless `name` is a Keras Applications constructor."""
    names = architecture_names()
    if name in names:
        return
    close = [n for n in names if n.lower() == name.lower()]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    hint = f" Did you mean {' or '.join(repr(n) for n in close)}?" if close else ""
    raise UnknownArchitectureError(
        f"base.architecture {name!r} is not a Keras Applications model.{hint} "
        f"The full list is keras.applications ({APPLICATIONS_DOCS}); "
        f"this Keras has {len(names)} of them."
    )


def _constructor(architecture: str) -> Callable[..., keras.Model]:
    check_architecture(architecture)
    return getattr(keras.applications, architecture)


def _family(architecture: str) -> ModuleType:
    """The public keras.applications module of an architecture, e.g. ResNet50 -> resnet."""
    return getattr(keras.applications, _family_name(_constructor(architecture)))


# --- weights -------------------------------------------------------------------------------------


def keras_cache_dir() -> Path:
    """Where Keras keeps downloads ($KERAS_HOME, default ~/.keras), read now, not at import.

    Keras itself reads KERAS_HOME once, when keras is imported, so a KERAS_HOME set later
    (a test, a flow parameter) would otherwise be ignored.
    """
    home = os.environ.get("KERAS_HOME")
    if home:
        return Path(home).expanduser().absolute()
    base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
    return base / ".keras"


class _WeightsFileRequest(Exception):
    """What a Keras Applications constructor asked get_file for; raised to stop the build there."""

    def __init__(self, fname: str, origin: str, file_hash: str | None, cache_subdir: str):
        super().__init__(fname)
        self.fname = fname
        self.origin = origin
        self.file_hash = file_hash
        self.cache_subdir = cache_subdir


_intercept_lock = threading.Lock()


@contextmanager
def _stop_at_weights_download() -> Iterator[None]:
    """Make this thread's Keras weight fetches raise _WeightsFileRequest instead of downloading.

    The file name of ImageNet weights depends on the architecture and its options (MobileNet's
    alpha and input size, ...); asking the constructor itself avoids copying Keras' naming rules.
    Other threads keep the real get_file.
    """
    real_get_file = keras.utils.get_file
    owner = threading.get_ident()

    def get_file(fname: Any = None, origin: Any = None, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return real_get_file(fname, origin, *args, **kwargs)
        name = str(fname) if fname else os.path.basename(str(origin).split("?")[0])
        raise _WeightsFileRequest(
            fname=name,
            origin=str(origin),
            file_hash=kwargs.get("file_hash") or kwargs.get("md5_hash"),
            cache_subdir=kwargs.get("cache_subdir", "datasets"),
        )

    with _intercept_lock, weights_fetched_through(get_file):
        yield


# What each base's constructor asked get_file for, and the weights files whose hash was checked
# (by path, size and modification time): building a base only to learn its file name took 0.8 s,
# in every cell a comparison worker trained.
_weights_requests: dict[tuple[str, int, str], _WeightsFileRequest] = {}
_checked_weights: set[tuple[str, int, int]] = set()


def _weights_request(architecture: str, image_size: int, options: dict[str, Any]):
    key = (architecture, image_size, repr(sorted(options.items())))
    if key not in _weights_requests:
        with _stop_at_weights_download():
            try:
                construct_base(architecture, "imagenet", image_size, options)
            except _WeightsFileRequest as request:
                _weights_requests[key] = request
            else:  # pragma: no cover - a Keras that no longer fetches through get_file
                raise RuntimeError(
                    f"keras.applications.{architecture} did not ask for a weights file; "
                    "tasks.model.bases cannot locate its ImageNet weights in this Keras version"
                ) from None
    return _weights_requests[key]


def _imagenet_weights_file(architecture: str, image_size: int, options: dict[str, Any]) -> Path:
    """The local ImageNet weights file for this base, downloaded into the cache when online."""
    wanted = _weights_request(architecture, image_size, options)
    folder = keras_cache_dir() / wanted.cache_subdir
    path = folder / wanted.fname
    if path.is_file():
        stat = path.stat()
        seen = (str(path), stat.st_size, stat.st_mtime_ns)
        if wanted.file_hash and seen not in _checked_weights:
            if not file_matches_hash(str(path), wanted.file_hash):
                raise WeightsNotFoundError(
                    f"{path} is not the genuine ImageNet weights file of {architecture} (its "
                    f"hash differs from {wanted.file_hash}). Replace it with the file from "
                    f"{wanted.origin}."
                )
            _checked_weights.add(seen)
        return path
    try:
        downloaded = keras.utils.get_file(
            wanted.fname,
            wanted.origin,
            cache_subdir=wanted.cache_subdir,
            file_hash=wanted.file_hash,
            cache_dir=str(keras_cache_dir()),
        )
    except Exception as error:
        raise WeightsNotFoundError(
            f"ImageNet weights for {architecture} (options {options or {}}, image size "
            f"{image_size}) are not at {path}, and downloading them from {wanted.origin} failed "
            f"({error}). Copy {wanted.fname} into {folder}/ ($KERAS_HOME/models/, default "
            "~/.keras/models/), or set base.weights to the path of a weights file."
        ) from error
    return Path(downloaded)


def resolve_weights(
    architecture: str,
    weights: str | None,
    options: dict[str, Any] | None,
    image_size: int = 224,
) -> str | None:
    """What to pass as `weights=` to the constructor: None, or an absolute path to a weights file.

    "imagenet" is resolved to the file in $KERAS_HOME/models/ as read at call time (downloaded
    there when online, WeightsNotFoundError naming it when not), so an offline run fails fast
    with the path to stage instead of a URL error. The ImageNet file name depends on the options
    and, for MobileNet, on image_size.
    """
    if weights is None:
        return None
    if weights == "imagenet":
        return str(_imagenet_weights_file(architecture, image_size, options or {}))
    path = Path(weights).expanduser().absolute()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"base.weights {weights!r}: there is no file at {path}. Set base.weights to the "
            "path of a weights file of this architecture, to 'imagenet' (looked for in "
            f"{keras_cache_dir() / 'models'}/, or downloaded when online), or to null."
        )
    return str(path)


def _check_options(architecture: str, options: dict[str, Any]) -> None:
    for key in options:
        if key in _RESERVED_OPTIONS:
            raise BaseOptionsError(
                f"base.options may not set {key!r} for {architecture}: {_RESERVED_OPTIONS[key]}."
            )
    accepted = set(inspect.signature(_constructor(architecture)).parameters) - set(
        _RESERVED_OPTIONS
    )
    for key in sorted(set(options) - accepted):
        close = difflib.get_close_matches(key, sorted(accepted), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BaseOptionsError(
            f"base.options {key!r}: keras.applications.{architecture} takes no such argument."
            f"{hint} It takes: {', '.join(sorted(accepted)) or 'nothing else'}."
        )


def construct_base(
    architecture: str, weights: str | None, image_size: int, options: dict[str, Any]
) -> keras.Model:
    """The base as its constructor returns it: `weights` as given, not frozen, in the dtype
    policy in force; BaseOptionsError where the constructor rejects `options` or `image_size`."""
    _check_options(architecture, options)
    try:
        return _constructor(architecture)(
            include_top=False,
            weights=weights,
            input_shape=(image_size, image_size, 3),
            **options,
        )
    except ValueError as error:
        minimum = re.search(r"at least (\d+)x(\d+)", str(error))
        if minimum:
            raise BaseOptionsError(
                f"data.image_size {image_size} is too small for {architecture}: set "
                f"data.image_size to at least {minimum.group(1)}."
            ) from error
        raise BaseOptionsError(
            f"keras.applications.{architecture} rejected base.options {options} with "
            f"base.weights {weights!r}: {error}"
        ) from error


def build_base(
    architecture: str,
    weights: str | None,
    image_size: int,
    options: dict[str, Any] | None = None,
    precision: str = "float32",
) -> keras.Model:
    """The Keras Applications base without its top, for square RGB images, frozen.

    Its layers compute in `precision` (compute.precision); the weights stay float32 either way.
    """
    options = dict(options or {})
    resolved = resolve_weights(architecture, weights, options, image_size)
    with layer_precision(precision):
        base = construct_base(architecture, resolved, image_size, options)
    base.trainable = False
    return base


# --- preprocessing -------------------------------------------------------------------------------


def preprocessing_layer(architecture: str) -> keras.layers.Layer:
    """The family's own preprocess_input as a frozen Dense(3) over the channel axis.

    Every Keras Applications preprocess_input ("tf", "torch", "caffe" modes, or identity where
    the model normalises inside) is a per-pixel affine map of the three channels, so a plain
    Dense layer reproduces it exactly: the saved model then takes raw [0, 255] pixels and needs
    no Lambda or custom class to load in another process. The map is measured by probing the
    real function, so it follows Keras if a family's constants change.
    """
    family = _family(architecture)
    family_name = family.__name__.rsplit(".", 1)[-1]

    def preprocess(pixels: np.ndarray) -> np.ndarray:
        # preprocess_input works in place on float arrays: always hand it a copy.
        batch = np.array(pixels, dtype="float32").reshape(1, 1, -1, 3)
        out = keras.ops.convert_to_numpy(family.preprocess_input(batch))
        return np.asarray(out, dtype="float64").reshape(-1, 3)

    probes = np.vstack([np.zeros((1, 3)), 255.0 * np.eye(3)])
    responses = preprocess(probes)
    bias = responses[0]
    kernel = (responses[1:] - bias) / 255.0  # row i: the effect of input channel i

    pixels = np.random.default_rng(0).uniform(0.0, 255.0, size=(256, 3))
    expected = preprocess(pixels)
    if not np.allclose(pixels @ kernel + bias, expected, rtol=1e-5, atol=1e-3):
        worst = float(np.max(np.abs(pixels @ kernel + bias - expected)))
        raise PreprocessingNotAffineError(
            f"keras.applications.{family_name}.preprocess_input is not a per-pixel affine map "
            f"(off by up to {worst:.3g}), so it cannot be baked into the model as a Dense layer; "
            f"choose another base.architecture than {architecture}."
        )

    layer = keras.layers.Dense(3, name=f"preprocess_{family_name}", dtype="float32")
    layer.build((None, 3))
    layer.set_weights([kernel.astype("float32"), bias.astype("float32")])
    layer.trainable = False
    return layer
