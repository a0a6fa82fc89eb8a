"""Learning-rate schedules, per epoch as in the original scripts."""

from __future__ import annotations

import math

from mauctl.config import OptimConfig
from mauctl.text import plural


def lr_at(optim: OptimConfig, epoch: int) -> float:
    """LR for the 0-based ``epoch``: half-cosine to 0 over all epochs, or x0.1 from each milestone on."""
    if optim.cos:
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / optim.epochs))
    return optim.lr * 0.1 ** sum(epoch >= m for m in optim.schedule)


def describe_schedule(optim: OptimConfig) -> str:
    if optim.cos:
        return f"cosine from {optim.lr:g} to 0 over {plural(optim.epochs, 'epoch')} (per epoch)"
    inside = [m for m in optim.schedule if m < optim.epochs]
    outside = [m for m in optim.schedule if m >= optim.epochs]
    text = f"{optim.lr:g}, x0.1 from epoch " + ", ".join(str(m) for m in inside) if inside else f"constant {optim.lr:g}"
    if outside:
        text += f" (milestone{'s' if len(outside) > 1 else ''} {', '.join(map(str, outside))} after the last epoch)"
    return text + f", {plural(optim.epochs, 'epoch')}"
