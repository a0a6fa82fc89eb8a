"""The collapse guard: the spread of the batch's embeddings, watched at logging steps.

A uniformity or contrastive run most often fails by collapse: every image maps to (nearly) the
same point, the loss can look calm (a queue of random keys keeps L_uniform low), and nothing
stops the run. The statistic (SimSiam, Chen & He 2021, Sec. 4.1) is the standard deviation
across the batch of each dimension of the normalised queries, averaged over the dimensions:
about 1/sqrt(d) when they spread over the sphere, 0 when they are one point. It is computed in
training mode on each step's own queries (a device tensor, read with the other terms), not
from the held-out diagnostics: those run in eval mode, where BatchNorm's running statistics lag
behind the weights in the first epochs and can make a healthy encoder look collapsed.

The threshold, a tenth of 1/sqrt(d), and three logging steps in a row: measured in training mode,
healthy runs stay at 0.4-0.9 of 1/sqrt(d) (the demo's lowest, 0.42, is at its first step; tiny
ResNet-18 runs 0.5-0.8), while runs that collapse fall to 0.003-0.05 within one or two epochs (the
demo at 4x its LR; a queue 85 times the dataset; alignment alone at a huge LR). Embeddings spread
evenly over just two of 128 dimensions stay above it (sqrt(2)/d = 0.125 / sqrt(d)); three logging
steps in a row (30 steps at the default run.print_freq) let a brief dip pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mauctl import presets
from mauctl.config import OptimConfig, PretrainConfig
from mauctl.errors import RunError, UsageError

Q_STD = "q_std"
FRACTION = 0.1  # the threshold, as a fraction of 1/sqrt(d)
PATIENCE = 3  # logging steps in a row below it


def embedding_std(q: torch.Tensor) -> torch.Tensor:
    """Per-dimension std of the rows of ``q`` (unit vectors), averaged over dimensions; a device tensor."""
    return q.detach().float().std(dim=0).mean()


class CollapseDetector:
    """Counts the logging steps in a row whose q_std is below ``fraction / sqrt(dim)``."""

    def __init__(self, dim: int, fraction: float = FRACTION, patience: int = PATIENCE) -> None:
        self.spread = 1.0 / math.sqrt(dim)  # q_std of embeddings spread over the sphere
        self.threshold, self.patience = fraction * self.spread, patience
        self.low = 0  # logging steps in a row below the threshold

    def update(self, q_std: float) -> bool:
        """Count one logging step's q_std; True at the step where it has been low ``patience`` times in a
        row (once per collapse: a run that recovers and collapses again is reported again)."""
        self.low = self.low + 1 if q_std < self.threshold else 0
        return self.low == self.patience


class CollapseGuard:
    """The pretraining loop's watch over q_std: at a collapse, a loud warning with its likely causes,
    a ``{"kind": "warning", "what": "collapse"}`` record, and with run.stop_on_collapse the stop."""

    def __init__(self, cfg: PretrainConfig, reporter: Any, run: Any, train_images: int,
                 preset: str | None) -> None:
        self.detector = CollapseDetector(cfg.model.dim)
        self.reporter, self.run, self.stop = reporter, run, cfg.run.stop_on_collapse
        self.causes = likely_causes(cfg, train_images, preset)

    def check(self, values: dict[str, float], state: Any) -> None:
        """At a logging step (``values``: its means; ``state``: the run's TrainState). The values are the
        same on every rank (q_std is taken over the global batch), so every rank stops together."""
        q_std = values.get(Q_STD)
        if q_std is None or not self.detector.update(q_std):
            return
        d = self.detector
        epoch, step = state.epoch, state.step_in_epoch
        what = (f"collapse at epoch {epoch + 1}, step {step}: the embeddings are close to one point (q_std below "
                f"{d.threshold:.2g} for {d.patience} logging steps, now {q_std:.2g}; about {d.spread:.2g} when they "
                "spread)")
        then = ("training stops (run.stop_on_collapse)" if self.stop
                else "training goes on; run.stop_on_collapse = true stops such a run")
        self.reporter.warn(f"WARNING: {what}. Likely causes: {self.causes}. {then.capitalize()}.",
                           {"kind": "warning", "what": "collapse", "epoch": epoch, "step": state.global_step,
                            "step_in_epoch": step, Q_STD: q_std, "threshold": d.threshold,
                            "stopped": self.stop, "causes": self.causes})
        if not self.stop:
            return
        if self.run is not None:
            self.run.set_status("failed", epoch=epoch, step_in_epoch=step, reason="collapse")
        raise RunError(f"{what}; training stopped, the last checkpoint is kept",
                       hint="Fix the likely causes above and start over with --overwrite: resuming goes on "
                            "from a checkpoint that may already be collapsed.")


def likely_causes(cfg: PretrainConfig, train_images: int, preset: str | None) -> str:
    """One clause per likely cause of a collapse, from the config; the LR when none stands out."""
    causes = []
    lr, batch = cfg.optim.lr, cfg.optim.batch_size
    reference = _preset_lr(preset)
    if reference is not None and lr / batch > reference[0] / reference[1] * 1.01:
        ref_lr, ref_batch = reference
        causes.append(f"optim.lr {lr:g} at batch {batch} is {_times(lr / batch / (ref_lr / ref_batch))} preset "
                      f"{preset}'s LR per image ({ref_lr:g} at batch {ref_batch}; --lr {ref_lr * batch / ref_batch:.3g} "
                      "keeps that)")
    queue = cfg.model.queue_size
    if queue > train_images and (cfg.loss.unif_w or cfg.loss.contr_w):
        per_epoch = max(batch, train_images // batch * batch)  # the keys pushed in an epoch
        causes.append(f"model.queue_size {queue} is {_times(queue / train_images)} the {train_images} training images "
                      f"(L_uniform barely pushes apart until its random initial keys are replaced, in about "
                      f"{queue // per_epoch:,} epochs; --set model.queue_size={per_epoch} fits)")
    loss = cfg.loss
    if not loss.unif_w and not loss.contr_w:
        causes.append("only the alignment loss is on (loss.unif_w = loss.contr_w = 0): nothing keeps the "
                      "embeddings apart")
    elif loss.unif_w and not loss.contr_w and loss.align_w / loss.unif_w > _published_align_ratio():
        causes.append(f"loss.align_w {loss.align_w:g} is {_times(loss.align_w / loss.unif_w)} loss.unif_w, above "
                      f"the published columns' {_published_align_ratio():g}x")
    return "; ".join(causes) if causes else f"optim.lr {lr:g} may be too high for this data (try half of it)"


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x" if ratio < 1000 else f"{ratio:,.0f}x"


def _preset_lr(preset: str | None) -> tuple[float, int] | None:
    """(lr, batch size) of the preset a run came from, None without one."""
    if not preset:
        return None
    try:
        optim = presets.load_preset(preset).values.get("optim", {})
    except UsageError:  # a config file's [preset] base that is no preset (any more)
        return None
    default = OptimConfig()
    return float(optim.get("lr", default.lr)), int(optim.get("batch_size", default.batch_size))


def _published_align_ratio() -> float:
    """The largest align_w / unif_w of the published loss columns (4 for align4-unif4)."""
    return max(c["align_w"] / c["unif_w"] for c in presets.loss_columns().values() if c.get("unif_w"))
