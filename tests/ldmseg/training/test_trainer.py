"""The training engine: TrainState and train_step against the step functions, and the Trainer's cadences."""

from __future__ import annotations

import numpy as np
import torch

from ldmseg.models.build import build_components
from ldmseg import training
from helpers_batches import scene_batch
from helpers_training import training_cfg


def test_engine_steps_are_the_step_functions_on_the_stage_built_from_its_seed(tmp_path):
    """TrainState.create + train_step give the losses of the step functions called by hand on
    modules built after seeding with the stage's seed (same RNG streams, same op order), and the
    resume file restores a state that continues identically."""
    from ldmseg.checkpoint import load_model, save_model
    from ldmseg.models.mask_autoencoder import MaskAutoencoder
    from ldmseg.training.state import TrainState

    cfg = training_cfg("train_ldm.ema_decay=0.9")
    batches = [scene_batch(cfg, 4, seed=s) for s in (3, 4, 5)]

    torch.manual_seed(cfg.train_ae.seed)
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    opt, sched = training.make_optimizer(ae.parameters(), cfg.train_ae)
    g = torch.Generator().manual_seed(5)
    by_hand = [training.ae_train_step(ae, b, opt, cfg, generator=g, lr_scheduler=sched)["loss"] for b in batches]
    state = TrainState.create("ae", cfg)
    state.seed_generator(5)
    assert [training.train_step(state, b)["loss"] for b in batches] == by_hand and state.step == 3

    save_model(tmp_path / "ae", cfg, {"mask_autoencoder": ae}, latent_scale=1.5)
    torch.manual_seed(cfg.train_ldm.seed)
    mask_ae = load_model(tmp_path / "ae").components["mask_autoencoder"].requires_grad_(False)
    parts = build_components(cfg, mask_ae=mask_ae)
    comps = training.LDMComponents(parts["denoiser"], mask_ae, parts["image_encoder"], latent_scale=1.5)
    opt, sched = training.make_optimizer(comps.denoiser.parameters(), cfg.train_ldm)
    comps.ema = training.make_ema(comps.denoiser, cfg.train_ldm.ema_decay)
    g = torch.Generator().manual_seed(7)
    by_hand = [training.ldm_train_step(comps, b, opt, cfg, generator=g, lr_scheduler=sched)["loss"] for b in batches]
    state = TrainState.create("ldm", cfg, ae_model=str(tmp_path / "ae"))
    state.seed_generator(7)
    assert [training.train_step(state, b)["loss"] for b in batches[:2]] == by_hand[:2]
    state.save(tmp_path)
    resumed = TrainState.create("ldm", cfg, ae_model=str(tmp_path / "ae"))
    resumed.load(tmp_path)
    assert resumed.step == 2
    for s in (state, resumed):
        s.seed_generator(11)
    assert training.train_step(resumed, batches[2]) == training.train_step(state, batches[2])
    for a, b in zip(state.judged().parameters(), resumed.judged().parameters()):
        assert torch.equal(a, b)


def test_trainer_checkpoints_and_monitors_at_their_cadences(tmp_path):
    """The Trainer reports every report_every steps, monitors every validate_every steps and once
    with the final model, and checkpoints loadable model folders with the resume file."""
    from pathlib import Path

    from ldmseg.checkpoint import load_model
    from ldmseg.training.state import TRAINER_STATE, TrainState
    from ldmseg.training.trainer import Reporter, Trainer

    cfg = training_cfg("train_ae.iterations=4", "train_ae.report_every=2", "train_ae.checkpoint_every=3",
                   "train_ae.validate_every=2")
    batch = scene_batch(cfg, 4)
    seen: list[tuple] = []

    class Record(Reporter):
        def report(self, step, metrics):
            seen.append(("report", step, metrics["world_size"]))

        def monitored(self, step, metrics, panel):
            seen.append(("monitor", step, panel.dtype))

        def checkpoint(self, step, metrics, folder):
            model = load_model(folder)
            assert (Path(folder) / TRAINER_STATE).is_file()
            seen.append(("checkpoint", step, model.meta["extra"]["final"], metrics["latent_scale"] > 0))

    state = TrainState.create("ae", cfg)
    assert Trainer(state, iter(lambda: batch, None), Record(), monitor_batch=batch).run() == 4
    assert seen == [("report", 2, 1), ("monitor", 2, np.uint8), ("checkpoint", 3, False, True),
                    ("report", 4, 1), ("monitor", 4, np.uint8), ("checkpoint", 4, True, True)]
