"""Training with per-epoch checkpoints and exact resume.

:func:`train` runs a :class:`TrainConfig` into the run store: per epoch it logs train / test loss,
top-1, top-5, the learning rate and the epoch time, and saves a checkpoint holding everything
needed to continue *bit-for-bit* (model, optimizer, the data-order / augmentation generator, the
global and CUDA RNGs used by dropout, the mixup generator, the loss scaler). A run killed at any
point and resumed with :func:`resume` ends with the same metrics and weights as an uninterrupted
run (CPU; on CUDA with ``deterministic`` on the same GPU and software). A non-finite loss stops
the run, marks it ``failed`` and keeps the last good checkpoint.

The modules: :mod:`~probe.training.config` (the config, presets, schedules, devices),
:mod:`~probe.training.build` (building a model, rebuilding a stored run's model),
:mod:`~probe.training.loop` (the loop and evaluation), :mod:`~probe.training.resume`,
:mod:`~probe.training.state` (the random, optimizer and loss-scaler state a checkpoint holds),
:mod:`~probe.training.weights` (a model's weights from a file of one's own) and
:mod:`~probe.training.numerics` (the AMP dtype, deterministic algorithms, the recorded environment).

The submodule :mod:`probe.training.resume` shares its name with the function: the names below are
bound after every submodule is imported, so ``probe.training.resume`` is the function.
"""
from __future__ import annotations

from probe.training.build import (MAX_MODEL_ELEMENTS, build_model, check_model, load_run_model,
                                  model_name_for_run, sync_batchnorm)
from probe.training.config import (MAX_BATCH, MAX_EPOCHS, MAX_LR, MAX_SEED, PRESETS, TrainConfig, check_device,
                                   lr_at, parse_schedule, resolve_device)
from probe.training.numerics import choose_amp_dtype, deterministic, environment
from probe.training.loop import TrainingDiverged, TrainResult, evaluate, train
from probe.training.resume import resume
from probe.training.weights import file_sha256, load_weights, read_state_dict

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "train", "resume", "lr_at",
           "parse_schedule", "build_model", "check_model", "model_name_for_run", "load_run_model",
           "sync_batchnorm", "check_device", "resolve_device", "evaluate", "MAX_EPOCHS", "MAX_BATCH", "MAX_LR",
           "MAX_SEED", "MAX_MODEL_ELEMENTS", "choose_amp_dtype", "deterministic", "environment", "load_weights",
           "read_state_dict", "file_sha256"]
