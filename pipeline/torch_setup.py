"""What the stages that train share: seeding, the device, quiet progress bars (apart from `common`: torch is slow)."""

from __future__ import annotations

import functools
import os
import sys

import torch
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, cudnn deterministic: fastai's set_seed does all of it."""
    set_seed(seed, reproducible=True)


def compute_device():
    """CUDA when present, else CPU: the only two paths this pipeline supports."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_progress(learn) -> None:
    """One plain line per epoch instead of fastai's bars (walls of carriage returns in logs) when not on a terminal:
    without ProgressCallback, the Recorder hands each epoch's row to `learn.logger`."""
    if sys.stdout.isatty() or os.environ.get("PADDY_PROGRESS") == "1":
        return
    if any(isinstance(cb, ProgressCallback) for cb in learn.cbs):
        learn.remove_cb(ProgressCallback)
    learn.logger = functools.partial(_log_epoch_row, learn)


def _log_epoch_row(learn, row) -> None:
    fields = [f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}"
              for name, value in zip(learn.recorder.metric_names, row) if value is not None]
    print("  " + " ".join(fields), file=sys.stderr, flush=True)
