import pytest

from ldmseg.config import ConfigError, config_hash, load_config, parse_overrides, to_dict
from ldmseg.config_files import find_config
from paths import REPO, TINY_YAML


def test_tiny_and_coco_load():
    tiny = load_config(TINY_YAML)
    coco = load_config(REPO / "conf/coco.yaml")
    assert (tiny.data.resolution, tiny.data.num_slots, tiny.data.num_bits) == (64, 32, 5)
    assert (coco.data.resolution, coco.data.num_slots, coco.data.num_bits) == (512, 128, 7)
    assert coco.mask_ae.widths == (32, 64, 128, 256)


@pytest.mark.parametrize("name", ["tiny", "quickstart", "bench"])
def test_shipped_cpu_configs_build_a_mask_ae_of_their_shapes(name):
    import torch

    from ldmseg.models.mask_autoencoder import MaskAutoencoder

    cfg = load_config(REPO / f"conf/{name}.yaml")
    ae = MaskAutoencoder(cfg.mask_ae, cfg.data.num_slots)
    r, f = cfg.data.resolution, ae.downsample_factor
    z = ae.encode(torch.zeros(1, cfg.data.num_bits, r, r))
    assert tuple(z.shape) == (1, cfg.mask_ae.latent_channels, r // f, r // f)
    assert tuple(ae.decode(z).shape) == (1, cfg.data.num_slots, r, r)


def test_overrides_apply_with_types():
    cfg = load_config(TINY_YAML, ["train_ae.lr=3e-4", "data.num_slots=8", "sampling.sampler=euler",
                                                  "mask_ae.widths=[8,16]", "image_encoder.pretrained=null"])
    assert cfg.train_ae.lr == pytest.approx(3e-4)
    assert cfg.data.num_slots == 8 and cfg.data.num_bits == 3
    assert cfg.mask_ae.widths == (8, 16) and cfg.mask_ae.downsample_factor == 2
    assert cfg.image_encoder.pretrained is None


@pytest.mark.parametrize("override,needle", [
    ("data.foo=1", "unknown config key data.foo"),
    ("nosuch.x=1", "unknown config key nosuch"),
    ("train_ae.iterations=1.5", "train_ae.iterations: expected an integer"),
    ("data.resize_mode=stretch", "data.resize_mode: 'stretch' is not one of"),
    ("denoiser.self_condition=maybe", "denoiser.self_condition: expected true or false"),
    ("data.num_slots=30", "power of two"),
    ("mask_ae.widths=5", "mask_ae.widths: expected a list"),
    ("train_ldm.num_workers=3", "train_ldm.batch_size 32: not a multiple of num_workers 3"),  # not floored
    ("train_ae.num_workers=0", "train_ae.num_workers must be >= 1, got 0"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_YAML, [override])
    assert needle in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["train_ae.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_hash_is_stable_and_sensitive():
    a = load_config(TINY_YAML)
    b = load_config(TINY_YAML)
    c = load_config(TINY_YAML, ["train_ae.lr=0.5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert config_hash(a, ["data"]) == config_hash(c, ["data"])
    assert to_dict(a)["mask_ae"]["widths"] == [16, 32, 64]


def test_sampling_options_are_the_sampling_config_fields():
    from ldmseg.config import Config, SamplingConfig, sampling_fields, with_sampling

    cfg = with_sampling(Config(), {"steps": 7, "mask_th": 1, "sampler": None})
    assert (cfg.sampling.steps, cfg.sampling.mask_th, cfg.sampling.sampler) == (7, 1.0, "ddim")
    assert cfg.sampling.thresholds == {"mask_th": 1.0, "count_th": 0.002, "overlap_th": 0.5}
    assert set(SamplingConfig.THRESHOLDS) < set(sampling_fields()) and "THRESHOLDS" not in sampling_fields()
    with pytest.raises(ConfigError, match="unknown config key sampling.mask_threshold; valid keys here: autocast, batch_size"):
        with_sampling(cfg, {"mask_threshold": 0.3})
    with pytest.raises(ConfigError, match="sampling.steps: expected an integer"):
        with_sampling(cfg, {"steps": "ten"})


def test_named_sampling_configs_live_in_the_user_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from ldmseg import sampling_presets as presets

    monkeypatch.delenv("LDMSEG_HOME", raising=False)
    assert presets.presets_folder() == Path("~/.config/ldmseg/sampling").expanduser()
    monkeypatch.setenv("LDMSEG_HOME", str(tmp_path / "home"))
    assert presets.saved_presets() == []
    with pytest.raises(ConfigError, match=r"no sampling config named 'best' in .*home/sampling \(none saved yet"):
        presets.load_preset("best")
    path = presets.save_preset("best", {"sampler": "euler", "steps": 10, "mask_th": 1}, note="from sweep s1")
    assert path == tmp_path / "home" / "sampling" / "best.yaml"
    assert path.read_text() == "# from sweep s1\nsampling:\n  sampler: euler\n  steps: 10\n  mask_th: 1.0\n"
    assert presets.load_preset("best") == {"sampler": "euler", "steps": 10, "mask_th": 1.0}
    assert presets.load_preset(str(path)) == presets.load_preset("best")  # a path works too
    (tmp_path / "flat.yaml").write_text("steps: 3\n")  # the fields at the top level
    assert presets.load_preset(str(tmp_path / "flat.yaml")) == {"steps": 3}
    presets.save_preset("other", {"steps": 2})
    with pytest.raises(ConfigError, match=r"saved: best, other"):
        presets.load_preset("nope")
    with pytest.raises(ConfigError, match="unknown config key sampling.stepz.*holds the fields sampler, steps"):
        presets.save_preset("bad", {"stepz": 2})
    with pytest.raises(ConfigError, match="use letters, digits"):
        presets.save_preset("a b", {"steps": 2})
    with pytest.raises(ConfigError, match="no such file"):
        presets.load_preset(str(tmp_path / "missing.yaml"))


def test_numpy_numbers_are_accepted_as_config_values():
    import numpy as np

    from ldmseg.config import Config, with_sampling

    sampling = with_sampling(Config(), {"steps": np.int64(7), "eta": np.float32(0.5)}).sampling
    assert (sampling.steps, sampling.eta) == (7, 0.5) and type(sampling.steps) is int and type(sampling.eta) is float
    with pytest.raises(ConfigError, match="expected an integer"):
        with_sampling(Config(), {"steps": np.float64(7.0)})


def test_shipped_configs_are_found_by_name_and_unknown_names_list_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # away from the source tree's conf/
    assert find_config("quickstart") == find_config("conf/quickstart.yaml") == find_config("quickstart.yaml")
    assert find_config("quickstart").read_text() == (REPO / "conf" / "quickstart.yaml").read_text()
    assert load_config("tiny", ["data.num_slots=16"]).data.num_slots == 16
    with pytest.raises(ConfigError, match=r"does not exist.*bench, coco, quickstart, serve, tiny"):
        find_config("quickstrat")
    with pytest.raises(ConfigError, match="does not exist"):
        find_config(tmp_path / "other" / "quickstart.yaml")  # a path elsewhere is never replaced


def test_a_bare_no_means_the_choice_no_not_false():
    """YAML 1.1 reads ``no`` as False: for a choice that has ``no`` (``mixed_precision``,
    ``sampling.autocast``) the word is meant, in an override and in a file alike."""
    from ldmseg.config import load_config

    cfg = load_config("conf/coco.yaml", ["train_ldm.mixed_precision=no", "sampling.autocast=no"])
    assert cfg.train_ldm.mixed_precision == "no" and cfg.sampling.autocast == "no"
    with pytest.raises(ConfigError, match="train_ldm.mixed_precision: True is not one of"):
        load_config("conf/coco.yaml", ["train_ldm.mixed_precision=yes"])
    assert load_config(None, ["train_ae.use_gpu=no"]).train_ae.use_gpu is False  # a bool stays a bool
