"""Fixtures of the pipeline tests: a tiny trained model and the scenes it was trained on."""

from __future__ import annotations

import pytest

from helpers_config import EVALUATE, tiny_cfg
from ldmseg.checkpoint import build_components, save_model
from ldmseg.data.synthetic import write_scenes



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[str, str, object]:
    """A model folder whose mask AE was trained for 60 steps on the 6 test scenes (so decoded
    samples hold segments and the scores count false positives), random denoiser; the scenes."""
    import numpy as np
    import torch

    from ldmseg.data.encoding import image_to_tensor
    from ldmseg.data.resize import resize_pad
    from ldmseg.data.slots import clean_segments, remap_ids
    from ldmseg.data.synthetic import make_config, render_scene
    from ldmseg import training

    torch.manual_seed(0)
    cfg = tiny_cfg(*EVALUATE, "train_ae.lr=3e-3", "train_ae.warmup=1")
    root = tmp_path_factory.mktemp("tiny_model")
    write_scenes(root / "scenes", num_images=6, size=32, seed=21, max_things=3)
    synth, rng = make_config(6, size=32, seed=21, max_things=3), np.random.default_rng(0)
    images, slots, valids = [], [], []
    for scene in (render_scene(synth, i) for i in range(6)):  # the scenes just written
        clean = clean_segments(scene.id_map, scene.segments_info, cfg.data.min_segment_area)
        image, ids, valid, _ = resize_pad(scene.image, clean.id_map, cfg.data.resolution)
        images.append(image)
        slots.append(remap_ids(ids, cfg.data.num_slots, rng).slot_map)
        valids.append(valid)
    batch = {"image": image_to_tensor(np.stack(images)), "slot_map": torch.from_numpy(np.stack(slots)),
             "valid": torch.from_numpy(np.stack(valids))}
    parts = build_components(cfg)
    ae = parts["mask_autoencoder"]
    optimizer, lr_scheduler = training.make_optimizer(ae.parameters(), cfg.train_ae)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        training.ae_train_step(ae, batch, optimizer, cfg, generator=generator, lr_scheduler=lr_scheduler)
    scale = training.measure_latent_scale(ae.eval(), [batch], cfg.data.num_slots)
    save_model(root / "model", cfg, parts, latent_scale=scale)
    return str(root / "model"), str(root / "scenes"), cfg


@pytest.fixture(scope="session")
def served(tiny_model, ray_session):
    """``ldmseg serve`` of the tiny model on the session's Ray, on a free 127.0.0.1 port: its base
    URL (e.g. ``http://127.0.0.1:PORT``) and ``/v1/model`` info. Serve is shut down at the end."""
    from ray import serve

    from helpers_net import free_port
    from pipelines.serve import start

    model, _, _ = tiny_model
    port = free_port()
    info = start(model, port=port, overrides=["sampling.steps=2", "serve.request_timeout_s=60",
                                              "serve.max_request_bytes=2000000", "serve.max_pixels=4000000"])
    yield f"http://127.0.0.1:{port}", info
    serve.shutdown()
