"""The training curriculum: stages with loss-gated switches, and the learning-rate schedule.

A run goes through its recipe's `Stage` list in order. A stage ends at the first of:
- its gate: the copy loss (answer cross-entropy on the auxiliary copying samples, per-sample
  mean over the answer tokens, nats) smoothed by an exponential moving average fell below
  ``copy_loss_below``, after at least ``min_steps`` of the stage's own batches;
- its step cap, ``max_steps`` of its own batches (the gate was not met in time: the run moves
  on rather than spending its whole budget on one stage);
- ``until_progress``: the run's progress (the larger of the elapsed fraction of the wall-clock
  budget and of ``--max-steps``) reached this fraction.
The last stage never ends. Only batches drawn for the current stage count (each batch carries
the stage it was drawn for; DataLoader workers prefetch a few batches ahead, so the first
batches after a switch still belong to the previous stage).

The learning rate warms up linearly, stays at its peak, then decays on a half cosine to
``final`` × peak over the last ``1 - decay_from`` of the progress (warm-up, stable, decay): the
stable phase does not depend on when a gated stage ends, and a run cut by its wall-clock budget
still ends annealed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from training.data import LengthMix


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: its batches (`mix`) and when it ends (see the module docstring).

    ``copy_loss_below`` is in nats (a copy that is not learned costs about ln(vocab), 8.3 nats
    for the 4,096-token vocabulary); ``min_steps`` and ``max_steps`` count the stage's own
    batches; ``until_progress`` is a fraction in (0, 1]."""

    name: str
    mix: LengthMix
    copy_loss_below: float | None = None
    min_steps: int = 0
    max_steps: int | None = None
    until_progress: float | None = None


@dataclass
class Switch:
    """A stage that ended: ``reason`` is ``"copy_loss"``, ``"max_steps"`` or ``"progress"``;
    ``step`` is the global step count at the switch; ``copy_loss_ema`` is None when the stage
    saw no copying sample."""

    stage: str
    next_stage: str
    reason: str
    step: int
    stage_steps: int
    progress: float
    copy_loss_ema: float | None

    def to_json(self) -> dict:
        return {"stage": self.stage, "next_stage": self.next_stage, "reason": self.reason,
                "step": self.step, "stage_steps": self.stage_steps,
                "progress": round(self.progress, 4),
                "copy_loss_ema": None if self.copy_loss_ema is None
                else round(self.copy_loss_ema, 4)}


class Curriculum:
    """Tracks the stage in force. ``observe`` is called once per optimizer step with the stage
    the batch was drawn for, the batch's copy loss (None when it held no copying sample) and
    the run's progress; it returns the switches that step caused (usually none).

    Raises ValueError for an empty stage list or a gate without ``max_steps`` or
    ``until_progress`` (a gate that is never met would hold the run in its stage for ever)."""

    def __init__(self, stages: list[Stage], ema_decay: float = 0.9):
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        for s in stages[:-1]:
            if s.max_steps is None and s.until_progress is None:
                raise ValueError(f"stage {s.name!r} has no step cap and no progress limit")
        self.stages = stages
        self.ema_decay = ema_decay
        self.index = 0
        self.stage_steps = 0
        self.copy_loss_ema: float | None = None
        self.switches: list[Switch] = []

    @property
    def stage(self) -> Stage:
        return self.stages[self.index]

    def observe(self, batch_stage: int, copy_loss: float | None, progress: float,
                step: int) -> list[Switch]:
        if batch_stage == self.index:
            self.stage_steps += 1
            if copy_loss is not None and math.isfinite(copy_loss):
                self.copy_loss_ema = (copy_loss if self.copy_loss_ema is None else
                                      self.ema_decay * self.copy_loss_ema
                                      + (1 - self.ema_decay) * copy_loss)
        done = []
        while self.index < len(self.stages) - 1:
            reason = self._reason(progress)
            if reason is None:
                break
            nxt = self.stages[self.index + 1]
            done.append(Switch(self.stage.name, nxt.name, reason, step, self.stage_steps,
                               progress, self.copy_loss_ema))
            self.index += 1
            self.stage_steps = 0
            self.copy_loss_ema = None
        self.switches += done
        return done

    def _reason(self, progress: float) -> str | None:
        s = self.stage
        if (s.copy_loss_below is not None and self.copy_loss_ema is not None
                and self.stage_steps >= s.min_steps and self.copy_loss_ema < s.copy_loss_below):
            return "copy_loss"
        if s.max_steps is not None and self.stage_steps >= s.max_steps:
            return "max_steps"
        if s.until_progress is not None and progress >= s.until_progress:
            return "progress"
        return None


def lr_at(step: int, progress: float, peak: float, warmup: int, decay_from: float = 0.6,
          final: float = 0.1) -> float:
    """The learning rate for optimizer step `step` (0-based) at `progress` in [0, 1]: linear
    warm-up over `warmup` steps, `peak` until `decay_from`, then a half cosine down to
    ``final * peak`` at progress 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if progress <= decay_from:
        return peak
    t = min(1.0, (progress - decay_from) / max(1e-9, 1.0 - decay_from))
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t)))
