"""The demo's datasets, held in memory as tensors, and a lean shuffling batch loader over them.

``digits`` (the default) is scikit-learn's copy of the UCI handwritten digits: 1797 8×8 grey images of
the digits 0–9 that ship inside scikit-learn, so the demo never needs the network. ``fashion-mnist`` is
read through torchvision from files already on disk (``--root``); nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

#: names accepted by :func:`load_dataset` (and the demo's ``--data``)
DATASET_NAMES = ("digits", "fashion-mnist")

# The digits split is fixed, not drawn from --seed, so every run (and every seed) validates on the same
# 360 images and accuracies can be compared across runs.
_DIGITS_VALIDATION_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

# Standardized features are divided by at least this, so the pixels that are (nearly) constant in the
# training set, such as the digits' always-blank corners, stay near zero instead of blowing up.
_MIN_STD = 1e-2


class DatasetUnavailable(RuntimeError):
    """The requested dataset cannot be loaded here (package missing, files missing); the message says
    what to install or where the files are expected."""


@dataclass
class TensorSplit:
    """One split of a dataset as two tensors: ``images`` of shape ``(N, C, H, W)`` (float32,
    standardized) and ``labels`` of shape ``(N,)`` (int64 class indices)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.images.to(device), self.labels.to(device))


@dataclass
class ClassificationData:
    """A train and a validation split with what the model needs to know about them."""

    name: str
    train: TensorSplit
    validation: TensorSplit
    num_classes: int
    description: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train.images.shape[1:])

    @property
    def num_features(self) -> int:
        """Inputs of the first Linear layer after Flatten: C·H·W."""
        n = 1
        for s in self.image_shape:
            n *= s
        return n

    def to(self, device: torch.device | str) -> ClassificationData:
        return ClassificationData(
            self.name, self.train.to(device), self.validation.to(device), self.num_classes, self.description
        )


def standardize(train_images: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Scales every feature to zero mean and unit variance using the training split's statistics only
    (the validation split must not leak into them).

    Args:
        train_images (Tensor): ``(N, ...)`` training features; mean and std are taken over dim 0.
        *others (Tensor): further splits, ``(M, ...)``, transformed with the same statistics.

    Returns:
        tuple of Tensor: the standardized ``train_images`` followed by the standardized ``others``.
    """
    mean = train_images.mean(dim=0, keepdim=True)
    std = train_images.std(dim=0, keepdim=True).clamp_min(_MIN_STD)
    return tuple((t - mean) / std for t in (train_images, *others))


def load_digits() -> ClassificationData:
    """scikit-learn's handwritten digits: 1437 training and 360 validation images, 1×8×8, 10 classes.

    The split is stratified and fixed (the same images every run), and the pixels are standardized
    with the training split's per-pixel mean and standard deviation.

    Example::

        >>> data = load_digits()
        >>> len(data.train), len(data.validation), data.image_shape, data.num_classes
        (1437, 360, (1, 8, 8), 10)
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise DatasetUnavailable(
            "--data digits needs scikit-learn (it ships the images): pip install scikit-learn"
        ) from e
    digits = sklearn_load_digits()
    train_x, val_x, train_y, val_y = train_test_split(
        digits.images, digits.target, test_size=_DIGITS_VALIDATION_FRACTION,
        random_state=_DIGITS_SPLIT_SEED, stratify=digits.target,
    )
    train_x, val_x = (torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) for x in (train_x, val_x))
    train_x, val_x = standardize(train_x, val_x)
    return ClassificationData(
        name="digits",
        train=TensorSplit(train_x.contiguous(), torch.as_tensor(train_y, dtype=torch.int64)),
        validation=TensorSplit(val_x.contiguous(), torch.as_tensor(val_y, dtype=torch.int64)),
        num_classes=10,
        description="scikit-learn handwritten digits",
    )


def load_fashion_mnist(root: str | os.PathLike) -> ClassificationData:
    """FashionMNIST (60000 training and 10000 test images, 1×28×28, 10 classes) from files under
    ``root`` as torchvision lays them out (``root/FashionMNIST/raw/*-ubyte[.gz]``). The test split is
    the validation split. Nothing is downloaded.

    Args:
        root (str or PathLike): the directory passed to ``torchvision.datasets.FashionMNIST``.

    Raises:
        DatasetUnavailable: torchvision is not installed, or the files are not under ``root``.
    """
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as e:
        raise DatasetUnavailable(
            "--data fashion-mnist reads the files through torchvision, which is not installed here "
            "(pip install torchvision); or use the built-in --data digits"
        ) from e
    try:
        train = FashionMNIST(root, train=True, download=False)
        test = FashionMNIST(root, train=False, download=False)
    except RuntimeError as e:
        raise DatasetUnavailable(
            f"--data fashion-mnist: no FashionMNIST files under --root {os.fspath(root)!r} "
            f"(expected {os.path.join(os.fspath(root), 'FashionMNIST', 'raw')}/train-images-idx3-ubyte and "
            "the other three files). The demo never downloads; fetch them once with "
            f"torchvision.datasets.FashionMNIST({os.fspath(root)!r}, download=True)."
        ) from e
    # The raw uint8 tensors are used directly: a per-sample ToTensor transform would cost more than the
    # model's forward pass.
    train_x, val_x = (d.data.to(torch.float32).div_(255.0).unsqueeze(1) for d in (train, test))
    train_x, val_x = standardize(train_x, val_x)
    return ClassificationData(
        name="fashion-mnist",
        train=TensorSplit(train_x.contiguous(), train.targets.to(torch.int64)),
        validation=TensorSplit(val_x.contiguous(), test.targets.to(torch.int64)),
        num_classes=len(train.classes),
        description="FashionMNIST",
    )


def load_dataset(name: str, root: str | os.PathLike | None = None) -> ClassificationData:
    """Loads one of :data:`DATASET_NAMES`.

    Args:
        name (str): ``"digits"`` or ``"fashion-mnist"``.
        root (str or PathLike, optional): where the FashionMNIST files are; required for it.

    Raises:
        DatasetUnavailable: the dataset cannot be loaded here; the message says why.
    """
    if name == "digits":
        return load_digits()
    if name == "fashion-mnist":
        if root is None:
            raise DatasetUnavailable(
                "--data fashion-mnist needs --root DIR, the directory holding FashionMNIST/raw "
                "(nothing is downloaded)"
            )
        return load_fashion_mnist(root)
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


class BatchLoader:
    """Mini-batches of a :class:`TensorSplit`, reshuffled every epoch, used like a ``DataLoader``.

    ``DataLoader`` over a ``TensorDataset`` indexes and collates one sample at a time, which for 8×8
    images costs more than the model itself; here a batch is one ``index_select`` per tensor. The order
    comes from a private generator, so two loaders built with the same ``seed`` yield the same batches
    in the same order, whatever else draws random numbers in between.

    Args:
        split (TensorSplit): the data, already on the device the model runs on.
        batch_size (int): samples per batch; the last batch of an epoch may be smaller.
        shuffle (bool, optional): a new random order every epoch (default: False).
        seed (int, optional): seed of the shuffling generator (default: 0).

    Example::

        >>> loader = BatchLoader(data.train, batch_size=64, shuffle=True, seed=0)
        >>> for batch, (X, y) in enumerate(loader):
        ...     pred = model(X)
    """

    def __init__(self, split: TensorSplit, batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self.dataset.images, self.dataset.labels
        n = len(self.dataset)
        if self.shuffle:
            # Drawn on the CPU generator so the order does not depend on the device.
            order = torch.randperm(n, generator=self._generator).to(images.device)
            for start in range(0, n, self.batch_size):
                index = order[start:start + self.batch_size]
                yield images.index_select(0, index), labels.index_select(0, index)
        else:
            for start in range(0, n, self.batch_size):
                yield images[start:start + self.batch_size], labels[start:start + self.batch_size]
