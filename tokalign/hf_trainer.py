"""transformers' Trainer with our data order and NaN guard, and the callback that logs a stage's curve.

Imported by ``tokalign/stages/train.py`` only when a training stage runs (this module imports torch
and transformers at its top; ``tokalign/trainer.py`` holds the light parts the stage imports always).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import SequentialSampler
from transformers import Trainer, TrainerCallback

from tokalign.trainer import TrainingDivergedError, checkpoints

log = logging.getLogger("tokalign.stages.train")


class OrderedTrainer(Trainer):
    """A Trainer that keeps the dataset's order and stops on a NaN/inf loss or gradient norm."""

    stage_name = "train"
    distiller = None  # a tokalign.distill.Distiller: the loss of train.objective=distill or mix

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.distiller is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        outputs = model(**inputs)
        loss = self.distiller.loss(outputs, inputs["input_ids"])
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        return SequentialSampler(ds)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        d = loss.detach().float().reshape(())
        acc = getattr(self, "_step_loss", None)
        self._step_loss = d if acc is None else acc + d
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        gn = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss = getattr(self, "_step_loss", None)
        self._step_loss = None
        vals = []
        if loss is not None:
            vals.append(loss.reshape(()))
        if gn is not None:
            g = gn if isinstance(gn, torch.Tensor) else torch.tensor(float(gn))
            vals.append(g.detach().float().reshape(()).to(vals[0].device if vals else g.device))
        if vals:
            v = torch.stack(vals).cpu()  # one sync per optimizer step
            if not torch.isfinite(v).all():
                step = self.state.global_step + 1
                last = checkpoints(Path(self.args.output_dir))
                what = "loss" if loss is not None and not math.isfinite(float(v[0])) else "gradient norm"
                raise TrainingDivergedError(
                    f"{self.stage_name}: the training {what} became {float(v[0 if what == 'loss' else -1])} at "
                    f"optimizer step {step} of {self.state.max_steps}; stopped before applying it. Last good "
                    f"checkpoint: {last[-1] if last else 'none'}. Lower the learning rate or check the data.")
        return gn


class StageCallback(TrainerCallback):
    """Logs ``<ns>/loss, lr, grad_norm, tokens_seen, tokens_per_s, passes`` and runs the light bpb eval."""

    def __init__(self, *, ns: str, tracker, tokens_per_step: int, start_idx: int, global_batch: int,
                 n_blocks: int, eval_fn, eval_steps: int) -> None:
        self.ns = ns
        self.tracker = tracker
        self.tokens_per_step = tokens_per_step
        self.start_idx = start_idx
        self.global_batch = global_batch
        self.n_blocks = n_blocks
        self.eval_fn = eval_fn
        self.eval_steps = eval_steps
        self.t_last: Optional[float] = None
        self.step_last = 0
        self.t_begin: Optional[float] = None
        self.step_begin = 0
        self.eval_seconds = 0.0
        self.last_eval_step = -1
        self.last_bpb: Optional[float] = None
        self.last_loss: Optional[float] = None

    def passes_at(self, step: int) -> float:
        return (self.start_idx + step * self.global_batch) / self.n_blocks

    def on_train_begin(self, args, state, control, **kw):
        self.t_begin = self.t_last = time.time()
        self.step_begin = self.step_last = state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        step = state.global_step
        now = time.time()
        dt = max(now - (self.t_last or now) - self._eval_since_last, 1e-9)
        tps = (step - self.step_last) * self.tokens_per_step / dt
        self.t_last, self.step_last, self._eval_since_last = now, step, 0.0
        self.last_loss = float(logs["loss"])
        rec = {f"{self.ns}/step": step, f"{self.ns}/loss": self.last_loss,
               f"{self.ns}/lr": float(logs.get("learning_rate", float("nan"))),
               f"{self.ns}/tokens_seen": step * self.tokens_per_step, f"{self.ns}/tokens_per_s": tps,
               f"{self.ns}/passes": self.passes_at(step)}
        if logs.get("grad_norm") is not None:
            rec[f"{self.ns}/grad_norm"] = float(logs["grad_norm"])
        if state.is_world_process_zero:
            self.tracker.log(rec)

    _eval_since_last = 0.0

    def run_eval(self, state, model) -> None:
        if self.eval_fn is None or state.global_step == self.last_eval_step:
            return
        t0 = time.time()
        res = self.eval_fn(model)  # {"bpb", "ci95"}
        dt = time.time() - t0
        self.eval_seconds += dt
        self._eval_since_last += dt
        self.last_eval_step = state.global_step
        if res is None:
            return
        bpb, ci = res["bpb"], res["ci95"]
        self.last_bpb = bpb
        state.log_history.append({"step": state.global_step, "eval_bpb": bpb, "eval_bpb_ci95": ci})
        if state.is_world_process_zero:
            self.tracker.log({f"{self.ns}/step": state.global_step, f"{self.ns}/eval_bpb": bpb,
                              f"{self.ns}/eval_bpb_ci95_low": ci[0], f"{self.ns}/eval_bpb_ci95_high": ci[1]})
        log.info("[%s] step %d: eval bits per byte %.4f (%.1fs)", self.ns, state.global_step, bpb, dt)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step is always logged, whatever logging_steps says
        if self.eval_steps > 0 and state.global_step % self.eval_steps == 0:
            self.run_eval(state, model)

    def on_train_end(self, args, state, control, model=None, **kw):
        if self.eval_steps > 0 and state.global_step % self.eval_steps != 0:
            self.run_eval(state, model)  # the final point of the in-training curve
