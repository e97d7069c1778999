"""Lean checkpoints: the EMA written once (the model folder's weights, built on the CPU), the EMA's
shadow optionally on the CPU, checkpoints staged in ``checkpoint_dir`` after a free-space check,
the reporter's ownership of the staged folder, and the completeness checks resume relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_batches import scene_batch
from helpers_training import training_cfg
from ldmseg import training
from ldmseg.checkpoint import checkpoint_problems, load_model, save_model
from ldmseg.training.optim import ema_class, ema_weights, make_ema, trainable_names
from ldmseg.training.state import EMA_SHADOW_FILE, TRAINER_STATE, TrainState
from ldmseg.training.trainer import Reporter, Trainer, check_free_space


@pytest.fixture(scope="module")
def ae_folder(tmp_path_factory) -> str:
    """A mask-AE model folder (random weights) for the LDM stage."""
    cfg = training_cfg()
    state = TrainState.create("ae", cfg)
    folder = tmp_path_factory.mktemp("lean") / "ae"
    save_model(folder, cfg, {"mask_autoencoder": state.model}, latent_scale=1.5)
    return str(folder)


def ldm_state(ae_folder: str, *overrides: str) -> TrainState:
    return TrainState.create("ldm", training_cfg("train_ldm.ema_decay=0.9", *overrides), ae_model=ae_folder)


def run_steps(state: TrainState, n: int, seed: int = 7) -> None:
    state.seed_generator(seed)
    for s in range(n):
        training.train_step(state, scene_batch(state.cfg, 4, seed=3 + s))


class Keep(Reporter):
    """Records the checkpoint folders; ``own=True`` takes ownership (the trainer leaves them)."""

    def __init__(self, own: bool = False) -> None:
        self.own, self.folders = own, []

    def checkpoint(self, step, metrics, folder):
        if folder is not None:
            self.folders.append((step, folder, sorted(p.name for p in Path(folder).iterdir())))
        return self.own


def test_ema_on_cpu_keeps_the_shadow_on_the_host_and_averages_like_the_default(ae_folder):
    """train_ldm.ema_on_cpu reaches make_ema (the host step path) and gives the default's EMA bit for bit."""
    default, host = ldm_state(ae_folder), ldm_state(ae_folder, "train_ldm.ema_on_cpu=true")
    assert not default.ema.on_cpu and host.ema.on_cpu
    assert {p.device.type for p in host.ema.shadow_params} == {"cpu"}
    calls = []
    original = host.ema._host_copies
    host.ema._host_copies = lambda params: calls.append(len(params)) or original(params)
    run_steps(default, 3)
    run_steps(host, 3)
    assert calls == [len(host.ema.shadow_params)] * 3  # the host path ran, once per step
    assert default.ema.optimization_step == host.ema.optimization_step == 3
    for a, b in zip(default.ema.shadow_params, host.ema.shadow_params):
        assert torch.equal(a, b)


def test_the_host_ema_step_is_the_diffusers_update():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    on_device, on_host = ema_class()(params, decay=0.8), ema_class()(params, decay=0.8, on_cpu=True)
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        on_device.step(params)
        on_host.step(params)
    for a, b in zip(on_device.shadow_params, on_host.shadow_params):
        assert torch.equal(a, b)
    assert make_ema(torch.nn.Linear(2, 2), 0.5, on_cpu=True).on_cpu


def test_a_checkpoint_holds_the_ema_once_and_resumes_exactly(ae_folder, tmp_path):
    """denoiser.safetensors are the EMA weights (== the EMA copy of judged()); trainer_state.pt holds
    the raw model, AdamW, the EMA's counters but not its shadow; resume (also onto a CPU shadow)
    restores everything, and the next step matches."""
    cfg = training_cfg("train_ldm.ema_decay=0.9", "train_ldm.iterations=2", "train_ldm.checkpoint_every=2",
                       "train_ldm.report_every=1", f"train_ldm.checkpoint_dir={tmp_path / 'stage'}")
    state = TrainState.create("ldm", cfg, ae_model=ae_folder)
    state.seed_generator(7)
    batches = iter([scene_batch(cfg, 4, seed=s) for s in (3, 4)])
    reporter = Keep(own=True)
    assert Trainer(state, batches, reporter).run() == 2
    [(step, folder, names)] = reporter.folders
    assert step == 2 and Path(folder).parent == tmp_path / "stage"
    assert names == ["denoiser.safetensors", "mask_autoencoder.safetensors", "model.json", TRAINER_STATE]

    saved = load_file(str(Path(folder) / "denoiser.safetensors"))
    judged = state.judged().state_dict()
    assert saved.keys() == judged.keys() and all(torch.equal(saved[k], judged[k]) for k in saved)
    first = trainable_names(state.model)[0]
    assert not torch.equal(saved[first], state.model.state_dict()[first])  # the EMA, not the raw weights
    assert load_model(folder).components["denoiser"] is not None

    held = torch.load(Path(folder) / TRAINER_STATE, weights_only=True)
    assert sorted(held) == sorted(["model", "optimizer", "lr_scheduler", "step", "ema", "scaler", "skipped_steps",
                                   EMA_SHADOW_FILE])
    assert "shadow_params" not in held["ema"] and held["ema"]["optimization_step"] == 2
    assert held[EMA_SHADOW_FILE] == "denoiser.safetensors"
    shadow_bytes = sum(s.numel() * s.element_size() for s in state.ema.shadow_params)
    model_bytes = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
    file_bytes = (Path(folder) / TRAINER_STATE).stat().st_size
    assert file_bytes < model_bytes + 2 * shadow_bytes + shadow_bytes // 2  # model + AdamW, no second EMA

    for on_cpu in ("false", "true"):
        resumed = TrainState.create("ldm", training_cfg("train_ldm.ema_decay=0.9", f"train_ldm.ema_on_cpu={on_cpu}"),
                                    ae_model=ae_folder)
        resumed.load(folder)
        assert resumed.step == 2 and resumed.ema.optimization_step == 2
        assert {s.device.type for s in resumed.ema.shadow_params} == {"cpu"}
        for a, b in zip(state.ema.shadow_params, resumed.ema.shadow_params):
            assert torch.equal(a, b)
        for k, v in state.model.state_dict().items():
            assert torch.equal(v, resumed.model.state_dict()[k])
    state.seed_generator(11)
    resumed.seed_generator(11)
    batch = scene_batch(cfg, 4, seed=9)
    assert training.train_step(resumed, batch) == training.train_step(state, batch)
    for a, b in zip(state.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)


def test_the_older_resume_file_with_the_shadow_inside_still_loads(ae_folder, tmp_path):
    state = ldm_state(ae_folder)
    run_steps(state, 2)
    state.save(tmp_path)  # ema_in_model=False: the shadow in trainer_state.pt, as before
    assert "shadow_params" in torch.load(tmp_path / TRAINER_STATE, weights_only=True)["ema"]
    resumed = ldm_state(ae_folder, "train_ldm.ema_on_cpu=true")
    resumed.load(tmp_path)
    assert all(s.device.type == "cpu" for s in resumed.ema.shadow_params)
    assert all(torch.equal(a, b) for a, b in zip(state.ema.shadow_params, resumed.ema.shadow_params))


def test_monitoring_swaps_the_ema_in_and_restores_the_raw_weights(ae_folder):
    state = ldm_state(ae_folder)
    run_steps(state, 2)
    raw = {k: v.clone() for k, v in state.model.state_dict().items()}
    judged = state.judged().state_dict()
    with pytest.raises(RuntimeError, match="boom"):
        with state.ema_applied() as model:
            assert model is state.model
            assert all(torch.equal(v, judged[k]) for k, v in model.state_dict().items())
            raise RuntimeError("boom")
    assert all(torch.equal(v, raw[k]) for k, v in state.model.state_dict().items())
    with ema_weights(state.model, None) as model:
        assert model is state.model


def test_staged_folders_are_deleted_unless_the_reporter_owns_them(tmp_path):
    cfg = training_cfg("train_ae.iterations=2", "train_ae.checkpoint_every=1", "train_ae.validate_images=0",
                       f"train_ae.checkpoint_dir={tmp_path}")
    batch = scene_batch(cfg, 4)
    for own in (False, True):
        reporter = Keep(own=own)
        Trainer(TrainState.create("ae", cfg), iter(lambda: batch, None), reporter).run()
        assert [s for s, _, _ in reporter.folders] == [1, 2]
        assert [Path(f).exists() for _, f, _ in reporter.folders] == [own, own]


def test_the_free_space_check_runs_before_step_1_and_says_what_to_change(tmp_path, monkeypatch):
    import shutil

    cfg = training_cfg("train_ae.iterations=2", "train_ae.validate_images=0", f"train_ae.checkpoint_dir={tmp_path}")
    state = TrainState.create("ae", cfg)
    needed = state.checkpoint_bytes()
    params = sum(p.numel() * p.element_size() for p in state.model.parameters())
    assert needed >= 4 * params  # model folder + raw model + two AdamW moments
    usage = shutil.disk_usage(tmp_path)
    room_for_one = int(needed * 1.1) + (64 << 20)  # the check's 10 % + 64 MiB margin
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=room_for_one))
    steps = []

    class TwoAtOnce(Reporter):
        staged_checkpoints = 2

    with pytest.raises(OSError, match=r"train_ae.checkpoint_dir: .* bytes free .* set train_ae.checkpoint_dir="):
        Trainer(state, iter(lambda: steps.append(1) or scene_batch(cfg, 4), None), TwoAtOnce()).run()
    assert steps == [] and state.step == 0
    check_free_space(tmp_path, needed, "train_ae.checkpoint_dir")  # one staged checkpoint fits


def test_the_estimate_covers_a_written_checkpoint(ae_folder, tmp_path):
    state = ldm_state(ae_folder)
    before = state.checkpoint_bytes()  # no AdamW state yet: estimated
    run_steps(state, 1)
    after = state.checkpoint_bytes()
    save_model(tmp_path, state.cfg, state.stage.modules_to_save(state.model), latent_scale=1.0,
               state_dicts={"denoiser": state.saved_weights()})
    state.save(tmp_path, ema_in_model=True)
    written = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert abs(before - after) <= 0.01 * after
    assert 0.9 * written <= after <= 1.05 * written


def test_tied_weights_are_written_once_and_load_back(tmp_path):
    from ldmseg.checkpoint import save_state_dict

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    model = Tied()
    save_state_dict(model.state_dict(), tmp_path / "t.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a.bias", "a.weight", "b.bias"] and f.metadata()["b.weight"] == "a.weight"
    other = Tied()
    from safetensors.torch import load_model as st_load_model

    st_load_model(other, str(tmp_path / "t.safetensors"), strict=True)
    assert torch.equal(other.b.weight, model.a.weight)


def test_save_model_refuses_weights_of_another_module(tmp_path):
    cfg = training_cfg()
    ae = TrainState.create("ae", cfg).model
    with pytest.raises(ValueError, match="does not match its module's state dict"):
        save_model(tmp_path, cfg, {"mask_autoencoder": ae}, latent_scale=1.0,
                   state_dicts={"mask_autoencoder": {"x": torch.zeros(1)}})


def test_incomplete_checkpoint_folders_are_told_apart(ae_folder, tmp_path):
    state = ldm_state(ae_folder)
    run_steps(state, 1)
    save_model(tmp_path, state.cfg, state.stage.modules_to_save(state.model), latent_scale=1.0,
               state_dicts={"denoiser": state.saved_weights()})
    state.save(tmp_path, ema_in_model=True)
    required = (TRAINER_STATE, "model.json")
    assert checkpoint_problems(tmp_path, required) == []
    for name in (TRAINER_STATE, "denoiser.safetensors"):
        path = tmp_path / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
        [problem] = checkpoint_problems(tmp_path, required)
        assert problem.startswith(f"{name}: ")
        path.write_bytes(data)
    (tmp_path / "mask_autoencoder.safetensors").unlink()
    assert checkpoint_problems(tmp_path, required) == [
        "mask_autoencoder.safetensors missing (model.json lists component 'mask_autoencoder')"]
    assert checkpoint_problems(tmp_path / "nowhere", required)[0].endswith("does not exist")


def test_staged_folders_of_dead_processes_on_this_host_are_removed(tmp_path):
    import subprocess
    import sys

    from ldmseg.training.trainer import remove_stale_staging, staging_prefix

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    folders = {"dead": f"{staging_prefix(pid=dead_pid)}ae-step5-x", "alive": f"{staging_prefix()}ae-step5-y",
               "other_host": f"{staging_prefix(host='elsewhere', pid=dead_pid)}ae-step5-z", "unrelated": "keep-me"}
    for name in folders.values():
        (tmp_path / name).mkdir()
    assert remove_stale_staging(tmp_path) == [folders["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in folders.items() if k != "dead")
    assert remove_stale_staging(tmp_path / "missing") == []
