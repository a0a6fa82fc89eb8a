"""Test hooks: faults that tests/test_faults.py injects on purpose, through environment variables.

Nothing here does anything unless a ``MAUCTL_TEST_*`` variable is set; they exist so the fault
tests can break a real run at an exact point (no mocks of torch.distributed or of the launcher):

``MAUCTL_TEST_FAIL_SAVE=<n>[:<how>]``
    The n-th checkpoint this process writes fails after part of the temporary file is written.
    ``how`` is an errno name (``ENOSPC``, the default, or ``EACCES``, ...): the write raises that
    OSError, as a full disk or a revoked permission would; or ``kill``: the process SIGKILLs
    itself there, leaving the partial temporary file behind, as a crash would.
``MAUCTL_TEST_NAN_AT_STEP=<global step>[:loss]``
    At that training step (1-based), on the highest rank only, the gradient reaching the query
    encoder becomes NaN (the loss stays finite); with ``:loss`` the queries themselves do, so the
    (global) loss is NaN.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import BinaryIO

import torch

FAIL_SAVE = "MAUCTL_TEST_FAIL_SAVE"
NAN_AT_STEP = "MAUCTL_TEST_NAN_AT_STEP"

_saves = 0


def during_save(f: BinaryIO, tmp: str) -> None:
    """Called by ``checkpoint.save_atomic`` after the temporary file ``tmp`` is written, before it is synced."""
    global _saves
    spec = os.environ.get(FAIL_SAVE)
    if not spec:
        return
    _saves += 1
    nth, _, how = spec.partition(":")
    if _saves != int(nth):
        return
    f.flush()
    f.truncate(max(1, f.tell() // 2))  # half a checkpoint on disk, as when the write stopped part-way
    f.flush()
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, how or "ENOSPC")
    raise OSError(code, os.strerror(code), tmp)


def nan_at_step(q_local: torch.Tensor, global_step: int, rank: int, world_size: int) -> torch.Tensor:
    """``q_local`` unchanged, except at the step and rank named by $MAUCTL_TEST_NAN_AT_STEP."""
    spec = os.environ.get(NAN_AT_STEP)
    if not spec or rank != world_size - 1:
        return q_local
    step, _, what = spec.partition(":")
    if global_step != int(step):
        return q_local
    if what == "loss":
        return q_local * float("nan")
    if q_local.requires_grad:
        q_local.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return q_local
