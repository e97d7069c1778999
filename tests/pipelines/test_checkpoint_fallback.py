"""Resume after a truncated newest checkpoint: the driver's search (``latest_checkpoint``) and the
worker's load (``train_worker.resume``) both fall back to the complete checkpoint before it; the
driver fetches only the model files of the final checkpoint. No Ray cluster: checkpoints are
real ones (a tiny LDM TrainState) in a storage folder laid out like Ray Train's."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from helpers_batches import scene_batch
from helpers_training import training_cfg
from ldmseg import training
from ldmseg.checkpoint import MODEL_JSON, save_model
from ldmseg.training.state import TRAINER_STATE, TrainState

RUN = "ldm-test"
REQUIRED = (TRAINER_STATE, MODEL_JSON)


def write_checkpoint(state: TrainState, folder: Path) -> None:
    """A checkpoint folder as the Trainer writes it (EMA weights in the model folder, lean resume file)."""
    weights = state.saved_weights()
    save_model(folder, state.cfg, state.stage.modules_to_save(state.model), latent_scale=1.0,
               extra={"stage": state.name, "step": state.step},
               state_dicts={state.trained_component: weights} if weights is not None else None)
    state.save(folder, ema_in_model=True)


@pytest.fixture()
def storage(tmp_path) -> tuple[Path, str]:
    """Run storage with two checkpoints of run ``RUN`` (steps 1 and 2, the newer's resume file cut
    short as by a crash mid-upload); the AE folder the LDM stage was built with."""
    cfg = training_cfg("train_ldm.ema_decay=0.9")
    ae = tmp_path / "ae"
    save_model(ae, cfg, {"mask_autoencoder": TrainState.create("ae", cfg).model}, latent_scale=1.5)
    state = TrainState.create("ldm", cfg, ae_model=str(ae))
    state.seed_generator(7)
    run = tmp_path / "storage" / RUN
    for step, name in ((1, "checkpoint_2026-01-01_10-00-00.000001"), (2, "checkpoint_2026-01-01_10-05-00.000001")):
        training.train_step(state, scene_batch(cfg, 4, seed=step))
        assert state.step == step
        write_checkpoint(state, run / name)
    newest = run / "checkpoint_2026-01-01_10-05-00.000001" / TRAINER_STATE
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    return tmp_path / "storage", str(ae)


def test_latest_checkpoint_skips_a_truncated_newest(storage, caplog):
    from pipelines import ray_compat

    root, _ = storage
    with caplog.at_level(logging.WARNING):
        found = ray_compat.latest_checkpoint(str(root), RUN, REQUIRED)
    assert found is not None and found.path.endswith("checkpoint_2026-01-01_10-00-00.000001")
    assert "skipping incomplete checkpoint checkpoint_2026-01-01_10-05-00.000001" in caplog.text
    assert "trainer_state.pt: not a complete zip archive" in caplog.text
    assert ray_compat.latest_checkpoint(str(root), RUN, REQUIRED, older_than=found.path) is None
    assert ray_compat.latest_checkpoint(str(root), "other-run", REQUIRED) is None


def test_resume_after_a_truncated_newest_checkpoint(storage, caplog):
    """Ray hands the worker the truncated newest checkpoint: the worker resumes from the one before, at its step."""
    import ray.train

    from pipelines.train_worker import resume

    root, ae = storage
    newest = root / RUN / "checkpoint_2026-01-01_10-05-00.000001"
    state = TrainState.create("ldm", training_cfg("train_ldm.ema_decay=0.9"), ae_model=ae)
    with caplog.at_level(logging.WARNING):
        loaded = resume(state, ray.train.Checkpoint(str(newest)), str(root))
    assert loaded.endswith("checkpoint_2026-01-01_10-00-00.000001")
    assert state.step == 1 and state.ema.optimization_step == 1
    assert f"checkpoint {newest} is incomplete" in caplog.text and "resuming from the one before" in caplog.text

    older = root / RUN / "checkpoint_2026-01-01_10-00-00.000001"
    (older / "denoiser.safetensors").write_bytes(b"\x08")
    fresh = TrainState.create("ldm", training_cfg("train_ldm.ema_decay=0.9"), ae_model=ae)
    with pytest.raises(RuntimeError, match="no complete checkpoint to resume from .* delete that run folder"):
        resume(fresh, ray.train.Checkpoint(str(newest)), str(root))


def test_a_checkpoint_that_fails_to_load_falls_back_too(storage):
    """Complete-looking files that do not load (here: a resume file of another model) → the one before."""
    import ray.train

    from pipelines.train_worker import resume

    root, ae = storage
    run = root / RUN
    newest = run / "checkpoint_2026-01-01_10-10-00.000001"
    write_checkpoint(TrainState.create("ae", training_cfg()), newest)
    state = TrainState.create("ldm", training_cfg("train_ldm.ema_decay=0.9"), ae_model=ae)
    assert resume(state, ray.train.Checkpoint(str(newest)), str(root)).endswith("10-00-00.000001")
    assert state.step == 1


def test_the_driver_fetches_only_the_model_files(storage, tmp_path):
    import ray.train

    from ldmseg.checkpoint import load_model
    from pipelines import ray_compat

    root, _ = storage
    ckpt = ray.train.Checkpoint(str(root / RUN / "checkpoint_2026-01-01_10-00-00.000001"))
    names = ray_compat.fetch_checkpoint_files(ckpt, tmp_path / "model",
                                              lambda f: f == MODEL_JSON or f.endswith(".safetensors"))
    assert names == ["denoiser.safetensors", "mask_autoencoder.safetensors", MODEL_JSON]
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == names
    assert load_model(tmp_path / "model").meta["step"] == 1
    assert torch.is_tensor(next(iter(load_model(tmp_path / "model").components["denoiser"].state_dict().values())))
