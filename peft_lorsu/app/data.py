"""Real image sources for the LoRSU / RLP demo and benchmarks (turning them into CLIP inputs: :mod:`.inputs`).

Every loader returns a :class:`LabeledImages` ``(images, labels, class_names)``:

- ``images``: ``torch.uint8`` tensor of shape ``(N, 28, 28)``, light object on a dark background (MNIST style);
- ``labels``: ``torch.int64`` tensor of shape ``(N,)`` with values in ``[0, len(class_names))``;
- ``class_names``: the names used in captions and zero-shot prompts.

Sources (all offline once installed, see ``scripts/install_data.sh``): Fashion-MNIST from the Debian package
``dataset-fashion-mnist``, Animal-MNIST from the PyPI package ``animal-mnist==0.4``, handwritten digits from
scikit-learn, the few hundred images shipped in ``peft_lorsu/assets/demo``, and any HF ``datasets`` hub name when
the hub can be reached. Only torch, numpy and safetensors are imported at module import time.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .inputs import shift_domain

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# OpenAI CLIP's image normalisation (per RGB channel).
FASHION_MNIST_DIR = Path(os.environ.get("PEFT_LORSU_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DEMO_DIR = Path(__file__).resolve().parents[1] / "assets" / "demo"

# animal-mnist 0.4 stores gzip-compressed pickles of numpy arrays. Unpickling runs code, so the files are only read
# when their SHA256 matches these values (those of the 0.4 wheel's RECORD) and only numpy arrays may be rebuilt.
ANIMAL_MNIST_VERSION = "0.4"
ANIMAL_MNIST_SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}

SPLITS = ("train", "test", "all")
DEMO_SPLITS = ("target_train", "target_test", "control")
LOCAL_SOURCES = ("fashion_mnist", "animal_mnist", "digits", "demo")
# Hub names whose content is identical to a local source (same images, same label order).
HUB_ALIASES = {"zalando-datasets/fashion_mnist": "fashion_mnist", "fashion_mnist": "fashion_mnist"}
_CANONICAL_NAMES = {"fashion_mnist": FASHION_MNIST_CLASSES}
# Fixed held-out fractions for sources that ship without a train/test split (split seed 0, stratified).
_TEST_FRACTION = {"animal_mnist": 0.2, "digits": 0.5}
_SPLIT_SEED = 0


class LabeledImages(NamedTuple):
    """Images with class labels: ``images`` uint8 (N, H, W), ``labels`` int64 (N,), ``class_names`` list[str]."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _check_choice(field: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming ``field`` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def stratified_split(labels: torch.Tensor, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so each class keeps ``test_fraction`` of its items in the test part.

    Args:
        labels: int64 (N,).
    Returns:
        ``(train_idx, test_idx)``, sorted int64 index tensors that partition ``range(N)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def sample_per_class(labels: torch.Tensor, n_per_class: int, seed: int = 0) -> torch.Tensor:
    """Pick ``n_per_class`` random indices of every class (seeded); returns int64 (n_classes * n_per_class,)."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique(sorted=True).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < n_per_class:
            raise ValueError(f"n_per_class={n_per_class} exceeds the {len(idx)} items of class {c}")
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:n_per_class]])
    return torch.cat(picked)


def subset(data: LabeledImages, indices: torch.Tensor) -> LabeledImages:
    """Return the items at ``indices`` (int64 (M,)) with the same class names."""
    return LabeledImages(data.images[indices], data.labels[indices], list(data.class_names))


def concat_labeled(*parts: LabeledImages) -> LabeledImages:
    """Concatenate datasets with disjoint label spaces: labels of part k are offset by the classes before it."""
    images, labels, names = [], [], []
    for part in parts:
        images.append(part.images)
        labels.append(part.labels + len(names))
        names.extend(part.class_names)
    return LabeledImages(torch.cat(images), torch.cat(labels), names)


def _split_fixed(data: LabeledImages, source: str, split: str) -> LabeledImages:
    """Apply the project's fixed stratified split to a source that has none of its own."""
    _check_choice("split", split, SPLITS)
    if split == "all":
        return data
    train_idx, test_idx = stratified_split(data.labels, _TEST_FRACTION[source], seed=_SPLIT_SEED)
    return subset(data, train_idx if split == "train" else test_idx)


# ----------------------------------------------------------------------------------------------------------------
# local sources


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST format) of unsigned bytes into an array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "test", root: str | Path | None = None) -> LabeledImages:
    """Fashion-MNIST from the Debian package files (60,000 train / 10,000 test).

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        root: folder with the four ``*-idx?-ubyte.gz`` files; default ``/usr/share/datasets/fashion-mnist``
            (or ``$PEFT_LORSU_FASHION_MNIST_DIR``).
    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), the 10 class names.
    """
    _check_choice("split", split, SPLITS)
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefixes = {"train": ["train"], "test": ["t10k"], "all": ["train", "t10k"]}[split]
    images, labels = [], []
    for prefix in prefixes:
        img_path, lbl_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not img_path.is_file() or not lbl_path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST files not found under {root}: install them with "
                "`apt-get install -y dataset-fashion-mnist` (or scripts/install_data.sh), or pass the hub name "
                "'zalando-datasets/fashion_mnist' where the HF Hub is reachable"
            )
        images.append(torch.from_numpy(_read_idx(img_path).copy()))
        labels.append(torch.from_numpy(_read_idx(lbl_path).astype(np.int64)))
    return LabeledImages(torch.cat(images), torch.cat(labels), list(FASHION_MNIST_CLASSES))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (a second line of defence after the hash check)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an Animal-MNIST file")
        return super().find_class(module, name)


def _animal_mnist_dir() -> Path:
    """Folder of the installed animal-mnist data files (found without importing the package)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Animal-MNIST is not installed: run `pip install --no-deps animal-mnist=={ANIMAL_MNIST_VERSION}` "
            "(or scripts/install_data.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"


def _load_verified_array(path: Path) -> np.ndarray:
    """Check ``path`` against its pinned SHA256, then unpickle the numpy array inside."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    expected = ANIMAL_MNIST_SHA256[path.name]
    if digest != expected:
        raise ValueError(
            f"{path}: SHA256 {digest} differs from the pinned {expected}; refusing to unpickle it. "
            f"Reinstall with `pip install --no-deps --force-reinstall animal-mnist=={ANIMAL_MNIST_VERSION}`"
        )
    with gzip.open(io.BytesIO(raw), "rb") as f:
        array = _NumpyOnlyUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: expected a numpy array, found {type(array).__name__}")
    return array


def load_animal_mnist(split: str = "test") -> LabeledImages:
    """Animal-MNIST silhouettes (10 classes x 1,000), with a fixed stratified 80/20 train/test split (seed 0).

    Args:
        split: ``"train"`` (8,000), ``"test"`` (2,000) or ``"all"`` (10,000).
    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), the 10 class names.
    """
    _check_choice("split", split, SPLITS)
    folder = _animal_mnist_dir()
    images = _load_verified_array(folder / "animal_data_version_3.gz")
    labels = _load_verified_array(folder / "animal_label_version_3.gz")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"unexpected Animal-MNIST arrays: images {images.shape} {images.dtype}, labels {labels.shape}"
        )
    data = LabeledImages(
        torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)), list(ANIMAL_MNIST_CLASSES)
    )
    return _split_fixed(data, "animal_mnist", split)


def _to_mnist_frame(images: torch.Tensor, inner: int = 20) -> torch.Tensor:
    """Resize float images (N, h, w) in [0, 1] to ``inner`` pixels and centre them on a 28x28 black frame.

    Returns uint8 (N, 28, 28).
    """
    resized = torch.nn.functional.interpolate(
        images[:, None], size=(inner, inner), mode="bilinear", align_corners=False
    )[:, 0]
    pad = (IMAGE_SIZE - inner) // 2
    framed = torch.nn.functional.pad(resized, (pad, IMAGE_SIZE - inner - pad, pad, IMAGE_SIZE - inner - pad))
    return (framed.clamp(0, 1) * 255).round().to(torch.uint8)


def load_digits(split: str = "test") -> LabeledImages:
    """scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 20x20 and centred in 28x28 like MNIST.

    The split is a fixed stratified 50/50 split (seed 0): about 90 images per class on each side.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), class names ``"zero"`` .. ``"nine"``.
    """
    _check_choice("split", split, SPLITS)
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("handwritten digits need scikit-learn: `pip install scikit-learn`") from exc
    bunch = sk_load_digits()
    images = _to_mnist_frame(torch.from_numpy(bunch.images).float() / 16.0)
    data = LabeledImages(images, torch.from_numpy(bunch.target.astype(np.int64)), list(DIGIT_CLASSES))
    return _split_fixed(data, "digits", split)


def load_demo(split: str = "target_test", folder: str | Path | None = None) -> LabeledImages:
    """The small real-image set shipped in ``peft_lorsu/assets/demo`` (no extra package needed).

    Args:
        split: ``"target_train"`` / ``"target_test"`` (handwritten digits, which the base model gets wrong) or
            ``"control"`` (Fashion-MNIST test images, which it knows).
        folder: alternative folder with ``demo.safetensors`` and ``classes.json``.
    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), class names of that split.
    """
    from safetensors.torch import load_file

    _check_choice("split", split, DEMO_SPLITS)
    folder = Path(folder) if folder is not None else DEMO_DIR
    tensors = load_file(str(folder / "demo.safetensors"))
    meta = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    return LabeledImages(tensors[f"{split}.images"], tensors[f"{split}.labels"], list(meta[split]["class_names"]))


# ----------------------------------------------------------------------------------------------------------------
# HF hub datasets and the name dispatcher


def _hub_offline() -> bool:
    """True when the user asked huggingface_hub / datasets not to use the network."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags)


def load_hub_dataset(
    name: str, split: str = "test", image_column: str = "image", label_column: str = "label"
) -> LabeledImages:
    """Load an image-classification dataset with HF ``datasets.load_dataset`` and convert it to 28x28 grey.

    Args:
        name: hub name, e.g. ``"zalando-datasets/fashion_mnist"``.
        split: the dataset's own split name (``"train"``, ``"test"``, ...).
    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), class names from the label column's ``ClassLabel``.
    """
    try:
        import datasets as hf_datasets
    except ImportError as exc:
        raise ImportError(f"loading {name!r} from the HF Hub needs `pip install datasets`") from exc
    from tqdm.auto import tqdm

    ds = hf_datasets.load_dataset(name, split=split)
    for column in (image_column, label_column):
        if column not in ds.column_names:
            raise ValueError(f"{name}: column {column!r} not found; available columns: {ds.column_names}")
    feature = ds.features[label_column]
    class_names = list(feature.names) if hasattr(feature, "names") else [str(v) for v in sorted(set(ds[label_column]))]
    frames = []
    for pil in tqdm(ds[image_column], desc=f"converting {name}:{split}", leave=False):
        grey = pil.convert("L")
        if grey.size != (IMAGE_SIZE, IMAGE_SIZE):
            grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE))
        frames.append(torch.from_numpy(np.asarray(grey, dtype=np.uint8).copy()))
    labels = torch.tensor(ds[label_column], dtype=torch.int64)
    return LabeledImages(torch.stack(frames), labels, class_names)


def _load_local(source: str, split: str) -> LabeledImages:
    """Dispatch to the loader of a local source."""
    _check_choice("source", source, LOCAL_SOURCES)
    loader = {
        "fashion_mnist": load_fashion_mnist,
        "animal_mnist": load_animal_mnist,
        "digits": load_digits,
        "demo": load_demo,
    }[source]
    return loader(split)


def load_image_dataset(name: str, split: str = "test") -> LabeledImages:
    """Load a dataset by name, optionally domain-shifted: ``"<source>[:<shift>]"``.

    ``source`` is a local source (``fashion_mnist``, ``animal_mnist``, ``digits``, ``demo``) or an HF hub name
    (``owner/name``). A hub name is loaded with ``datasets`` when the hub is reachable; when it is not (or
    ``HF_HUB_OFFLINE=1``) and the name has a local twin (``zalando-datasets/fashion_mnist``), the local files are
    used. ``shift`` is one of ``inverted``, ``rotated``, ``low_contrast`` (see :func:`shift_domain`).

    Returns:
        images uint8 (N, 28, 28), labels int64 (N,), class names.
    """
    source, _, shift = name.partition(":")
    if source in LOCAL_SOURCES:
        data = _load_local(source, split)
    elif source in HUB_ALIASES and (_hub_offline() or importlib.util.find_spec("datasets") is None):
        logger.info("hub offline or `datasets` missing: using the local files for %s", source)
        data = _load_local(HUB_ALIASES[source], split)
    elif "/" in source or source in HUB_ALIASES:
        try:
            data = load_hub_dataset(source, split)
            if source in HUB_ALIASES:  # same label order as the local twin: use the project's caption names
                data = data._replace(class_names=list(_CANONICAL_NAMES[HUB_ALIASES[source]]))
        except (ImportError, OSError, ConnectionError) as exc:
            if source not in HUB_ALIASES:
                raise
            logger.warning("could not load %s from the hub (%s); using the local files", source, exc)
            data = _load_local(HUB_ALIASES[source], split)
    else:
        raise ValueError(f"name={name!r}: source must be one of {', '.join(LOCAL_SOURCES)} or a hub name owner/name")
    if shift:
        data = LabeledImages(shift_domain(data.images, shift), data.labels, data.class_names)
    return data
