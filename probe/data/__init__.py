"""Data sets held in memory as tensors, and a small deterministic batch loader.

:func:`load_data` returns a :class:`DataSplits`: normalised float32 images ``(N, C, H, W)`` and int64
labels ``(N,)`` for a train and a test split.  Nothing is downloaded; real data sets are read from local
files, looked for in the folders :func:`data_roots` lists (:func:`find_data` says where a data set's files
are without reading them):

=================================  ============================================================================
folder, in search order            searched
=================================  ============================================================================
``root`` (``--data-root``)         when given, and then alone
``$PROBE_DATA``                    when set
``./data``                         always (relative to the working directory)
``$PROBE_SYSTEM_DATA/<name>``      always; data sets installed as system packages.  The base defaults to
                                   ``/usr/share/datasets``: Debian's ``dataset-fashion-mnist`` installs
                                   ``/usr/share/datasets/fashion-mnist``
=================================  ============================================================================

The first folder holding a complete copy wins.  ``imagefolder`` reads only ``root``, ``npz`` only its file
(``npz:FILE``, or ``root``); ``digits`` and
``synthetic`` read no files.

=================  ==========================================================================  ==========
name               source and split                                                            mean / std
=================  ==========================================================================  ==========
``digits``         scikit-learn's bundled 8x8 digits (1797 images, values 0..16 scaled to      train split
                   [0, 1]); fixed stratified split, 25 % test, ``random_state=0`` (1347/450)
``synthetic``      class prototypes (smooth random patterns) plus Gaussian noise; any shape    train split
``cifar10``        binary (``data_batch_{1..5}.bin``, ``test_batch.bin``) or python format     CIFAR-10
``cifar100``       binary (``train.bin``, ``test.bin``; fine labels) or python format          CIFAR-100
``mnist``          idx files, optionally ``.gz``                                               MNIST
``fashion-mnist``  idx files, optionally ``.gz``; Debian package ``dataset-fashion-mnist``     F-MNIST
``imagefolder``    ``root/{train,test}/<class>/<image>`` or ``root/<class>/<image>`` split     ImageNet
                   stratified (``test_fraction=0.2``, ``split_seed=42``)
``caltech101``     ``101_ObjectCategories`` without ``BACKGROUND_Google``, stratified 80/20    ImageNet
                   split with ``random_state=42``, resized to 64x64 ignoring the aspect ratio
``npz``            one .npz file (``npz:FILE``): arrays ``x`` (N, ...), ``y`` (N,), optionally   as stored
                   ``x_test`` / ``y_test``, else split stratified (``test_fraction=0.2``,
                   ``split_seed=42``); any input shape (an (N, D) table too)
=================  ==========================================================================  ==========

Splits of real data sets never depend on ``seed``; ``seed`` only drives ``synthetic``.  The CIFAR python
format is a pickle: it is read with an allow-list unpickler that refuses anything a CIFAR batch does not
need, without running it.  Every missing, truncated or malformed file raises :class:`DataError` with the
expected on-disk layout; a missing data set's error also names every folder searched and how to get it.
Reading is bounded, so that a hostile file cannot exhaust memory or time: file sizes are capped
(:data:`probe.data.cifar.MAX_CIFAR_BATCH_BYTES`, :data:`probe.data.cifar.MAX_CIFAR_META_BYTES`), an idx
header is checked before its payload (:data:`probe.data.idx.MAX_IDX_BYTES`) and a gzip stream is
decompressed only as far as the header says, and a pickle is refused (:mod:`probe.data.cifar_pickle`) past
``MAX_PICKLE_OPS`` opcodes, ``MAX_PICKLE_DEPTH`` levels of nesting or ``MAX_PICKLE_ELEMENTS`` elements
(shared references counted each time they are reached).

One module per source (:mod:`~probe.data.digits`, :mod:`~probe.data.synthetic`, :mod:`~probe.data.cifar`,
:mod:`~probe.data.idx`, :mod:`~probe.data.imagefolder`) registers its data sets with
:func:`register_dataset`, which gives each name (and its aliases) to :func:`load_data`, :func:`data_roots`,
:func:`find_data`, :data:`DATASETS` and the help of ``probe train --data``: a new data set is one module
that calls it.
"""
from __future__ import annotations

from probe.data.batches import Augment, Loader, make_loader
from probe.data.registry import dataset_names, load_data, register_dataset, unregister_dataset
from probe.data.search import data_roots, find_data
from probe.data.splits import DataSplits

# The sources, imported for their registrations: this order is the order of DATASETS.
from probe.data import digits, synthetic, cifar, idx, imagefolder, npz  # noqa: F401  isort: skip
from probe.data.cifar import CIFAR10_CLASSES

__all__ = ["DATASETS", "DataSplits", "Augment", "Loader", "data_roots", "find_data", "load_data", "make_loader",
           "register_dataset", "unregister_dataset", "CIFAR10_CLASSES"]


def __getattr__(name: str):
    if name == "DATASETS":  # the registered names, in registration order, as they are now
        return dataset_names()
    raise AttributeError(f"module 'probe.data' has no attribute {name!r}")
