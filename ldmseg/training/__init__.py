"""The training engine of both stages, without Ray or MLflow (they plug in through a reporter).

- :mod:`~ldmseg.training.build`: :func:`build_stage`, the modules a stage trains;
- :mod:`~ldmseg.training.state`: :class:`TrainState` (optimiser, lr schedule, scaler, EMA,
  generator, step) and its resume file ``trainer_state.pt``;
- :mod:`~ldmseg.training.optim`: AdamW + warm-up/cosine, EMA, mixed precision;
- :mod:`~ldmseg.training.losses`: the diffusion loss; :mod:`~ldmseg.training.steps`: one step of
  each stage (``train_step(state, batch)``) and the latent scale;
- :mod:`~ldmseg.training.loop`: :class:`TrainLoop` and its report/validate/checkpoint hooks;
- :mod:`~ldmseg.training.trainer`: :class:`Trainer` (a stage run to its end) and :class:`Reporter`;
- :mod:`~ldmseg.training.monitor`: training-time PQ on a fixed batch and overlay panels.

The step-level names are importable from here (``from ldmseg import training``).
"""

from ldmseg.training.losses import LDMComponents, encode_targets, latent_weights, ldm_loss, masked_mse
from ldmseg.training.loop import Hooks, TrainLoop, train_loop
from ldmseg.training.optim import autocast_context, ema_copy, lr_factor, make_ema, make_optimizer, make_scaler
from ldmseg.training.steps import ae_train_step, ldm_train_step, measure_latent_scale, train_step

__all__ = ["Hooks", "LDMComponents", "TrainLoop", "ae_train_step", "autocast_context", "ema_copy",
           "encode_targets", "latent_weights", "ldm_loss", "ldm_train_step", "lr_factor", "make_ema",
           "make_optimizer", "make_scaler", "masked_mse", "measure_latent_scale", "train_loop", "train_step"]
