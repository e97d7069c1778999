"""Every command fails cleanly on bad input: exit 2, one line on stderr naming the input, no
traceback, and Ray not started (``pipelines.ray_compat.init_ray`` raises in these tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers_cli import GARBAGE, damaged_model, fails, good, no_ray  # noqa: F401 - fixtures
from ldmseg import inputs
from paths import REPO
from pipelines.cli import bad_input_message, main


@pytest.fixture(autouse=True)
def ray_never_starts(no_ray):
    yield


# Commands that load a config; each maps a config file and overrides to an argv.
def config_commands(good, tmp_path):
    return {
        "train": lambda cfg, ov: ["train", "ae", "--data", good["shards"], "--config", cfg, "--run-dir",
                                  str(tmp_path / "run"), *ov],
        "preprocess": lambda cfg, ov: ["preprocess", "--source", good["coco"], "--output", str(tmp_path / "out"),
                                       "--config", cfg, *ov],
        "quickstart": lambda cfg, ov: ["quickstart", "--workdir", str(tmp_path / "qs"), "--config", cfg, *ov],
        "tune schedules": lambda cfg, ov: ["tune", "schedules", "--data", good["shards"], "--ae", good["model"],
                                           "--output", str(tmp_path / "ts"), "--config", cfg, *ov],
        "model-summary": lambda cfg, ov: ["model-summary", "--config", cfg, *ov],
    }


CONFIG_COMMANDS = ["train", "preprocess", "quickstart", "tune schedules", "model-summary"]


# --------------------------------------------------------------------------------------------
# Row 1: an unknown config key, in the YAML file or in an override
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_unknown_key_in_override(command, good, tmp_path, capsys):
    argv = config_commands(good, tmp_path)[command](good["config"], ["train_ae.lrr=1e-3"])
    fails(argv, capsys, "train_ae.lrr", "valid keys")


BAD_CONFIG_FILES = {"unknown key": ("data:\n  resolution: 32\n  num_slotz: 8\n", "data.num_slotz"),
                    "yaml error": ("data: {resolution: 32\n", "not valid YAML")}


@pytest.mark.parametrize("command", [*CONFIG_COMMANDS, "synth"])
@pytest.mark.parametrize("problem", list(BAD_CONFIG_FILES))
def test_bad_config_file(problem, command, good, tmp_path, capsys):
    """Rows 1 and 2 in the YAML file itself: an unknown key, a YAML syntax error."""
    text, expected = BAD_CONFIG_FILES[problem]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    if command == "synth":
        argv = ["synth", str(tmp_path / "scenes"), "--config", str(bad)]
    else:
        argv = config_commands(good, tmp_path)[command](str(bad), [])
    fails(argv, capsys, str(bad), expected)


# --------------------------------------------------------------------------------------------
# Row 2: a YAML error in an override (or in the config file)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_yaml_error_in_override(command, good, tmp_path, capsys):
    argv = config_commands(good, tmp_path)[command](good["config"], ["train_ae.lr=[1,"])
    fails(argv, capsys, "train_ae.lr=[1,", "not valid YAML")


# --------------------------------------------------------------------------------------------
# Row 3: a missing input folder or file
# --------------------------------------------------------------------------------------------


MISSING = {
    "train --data": lambda g, m, t: ["train", "ae", "--data", m, "--run-dir", t],
    "train --config": lambda g, m, t: ["train", "ae", "--data", g["shards"], "--config", m, "--run-dir", t],
    "train --ae": lambda g, m, t: ["train", "ldm", "--data", g["shards"], "--ae", m, "--run-dir", t],
    "preprocess --source": lambda g, m, t: ["preprocess", "--source", m, "--output", t],
    "preprocess --annotations": lambda g, m, t: ["preprocess", "--images", g["coco"] + "/images", "--masks",
                                                 g["coco"] + "/panoptic", "--annotations", m, "--output", t],
    "preprocess --config": lambda g, m, t: ["preprocess", "--source", g["coco"], "--config", m, "--output", t],
    "evaluate --model": lambda g, m, t: ["evaluate", "--model", m, "--data", g["coco"], "--output", t],
    "evaluate --data": lambda g, m, t: ["evaluate", "--model", g["model"], "--data", m, "--output", t],
    "tune sampling --model": lambda g, m, t: ["tune", "sampling", "--model", m, "--data", g["coco"], "--output", t],
    "tune sampling --data": lambda g, m, t: ["tune", "sampling", "--model", g["model"], "--data", m, "--output", t],
    "tune schedules --data": lambda g, m, t: ["tune", "schedules", "--data", m, "--ae", g["model"], "--output", t],
    "tune schedules --ae": lambda g, m, t: ["tune", "schedules", "--data", g["shards"], "--ae", m, "--output", t],
    "tune inpainting --model": lambda g, m, t: ["tune", "inpainting", "--model", m, "--data", g["coco"],
                                                "--output", t],
    "tune inpainting --data": lambda g, m, t: ["tune", "inpainting", "--model", g["model"], "--data", m,
                                               "--output", t],
    "quickstart --config": lambda g, m, t: ["quickstart", "--config", m, "--workdir", t],
    "synth --config": lambda g, m, t: ["synth", t, "--config", m],
    "validate FOLDER": lambda g, m, t: ["validate", m],
    "pq --gt": lambda g, m, t: ["pq", "--gt", m, "--pred", g["coco"]],
}


@pytest.mark.parametrize("case", MISSING)
def test_missing_input(case, good, tmp_path, capsys):
    missing = str(tmp_path / "runs" / "typo")
    fails(MISSING[case](good, missing, str(tmp_path / "out")), capsys, missing)


def test_missing_input_message_says_how_to_fix(good, tmp_path, capsys):
    line = fails(["train", "ae", "--data", "runs/x", "--run-dir", str(tmp_path)], capsys)
    assert line == "ldmseg train: --data runs/x: no such folder; pass the output folder of 'ldmseg preprocess'"


def test_train_ldm_needs_ae(good, tmp_path, capsys):
    fails(["train", "ldm", "--data", good["shards"], "--run-dir", str(tmp_path)], capsys, "--ae")


def test_data_folder_of_the_wrong_kind(good, tmp_path, capsys):
    fails(["train", "ae", "--data", good["coco"], "--run-dir", str(tmp_path)], capsys, good["coco"], "preprocess")
    fails(["evaluate", "--model", good["model"], "--data", good["shards"] + "/..", "--output", str(tmp_path)],
          capsys, "panoptic.json")


# --------------------------------------------------------------------------------------------
# Rows 4 and 5: a model folder without model.json, or with garbage weights
# --------------------------------------------------------------------------------------------


MODEL_COMMANDS = {
    "evaluate": lambda g, m, t: ["evaluate", "--model", m, "--data", g["coco"], "--output", t],
    "train ldm": lambda g, m, t: ["train", "ldm", "--data", g["shards"], "--ae", m, "--run-dir", t],
    "tune sampling": lambda g, m, t: ["tune", "sampling", "--model", m, "--data", g["coco"], "--output", t],
    "tune schedules": lambda g, m, t: ["tune", "schedules", "--data", g["shards"], "--ae", m, "--output", t],
    "tune inpainting": lambda g, m, t: ["tune", "inpainting", "--model", m, "--data", g["coco"], "--output", t],
}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_folder_without_model_json(command, good, tmp_path, capsys):
    model = damaged_model(good, tmp_path, "no-json")
    fails(MODEL_COMMANDS[command](good, model, str(tmp_path / "out")), capsys, model, "no model.json")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_folder_with_garbage_weights(command, good, tmp_path, capsys):
    model = damaged_model(good, tmp_path, "garbage")
    fails(MODEL_COMMANDS[command](good, model, str(tmp_path / "out")), capsys, model, "denoiser.safetensors")


def test_good_model_folder_and_uris_pass(good):
    inputs.model("--model", good["model"])
    for uri in ("models:/ldmseg-ldm@current", "models:/ldmseg-ae/3", "runs:/0123abcd/model"):
        inputs.model("--model", uri)
    for uri in ("models:/", "models:/ldmseg-ldm@", "models:ldmseg", "runs:/"):
        with pytest.raises(inputs.InputError, match="not a model URI"):
            inputs.model("--model", uri)


def test_safetensors_error_anywhere_is_one_line(tmp_path):
    """The boundary itself turns a safetensors error (raised past the checks) into a message."""
    from safetensors import safe_open

    path = tmp_path / "x.safetensors"
    path.write_bytes(GARBAGE)
    with pytest.raises(Exception) as err:
        safe_open(str(path), framework="pt")
    assert "safetensors" in bad_input_message(err.value)


# --------------------------------------------------------------------------------------------
# Row 6: an unknown sampler, an out-of-range threshold, steps < 1 -- found before the model loads
# --------------------------------------------------------------------------------------------


SAMPLING = {
    "evaluate --sampler": (["evaluate", "--sampler", "ddimm"], "ddimm"),
    "evaluate --steps": (["evaluate", "--steps", "0"], "--steps 0"),
    "evaluate --mask-th": (["evaluate", "--mask-th", "1.5"], "--mask-th 1.5"),
    "evaluate --count-th": (["evaluate", "--count-th", "-0.1"], "--count-th -0.1"),
    "evaluate --overlap-th": (["evaluate", "--overlap-th", "2"], "--overlap-th 2"),
    "evaluate --samples": (["evaluate", "--samples", "0"], "--samples 0"),
    "tune sampling --samplers": (["tune", "sampling", "--samplers", "ddim,eulr"], "eulr"),
    "tune sampling --steps": (["tune", "sampling", "--steps", "5,0"], "--steps 0"),
    "tune sampling --mask-th": (["tune", "sampling", "--mask-th", "0.5,1.5"], "--mask-th 1.5"),
    "tune sampling --steps text": (["tune", "sampling", "--steps", "5,ten"], "--steps 5,ten"),
    "tune sampling --samples": (["tune", "sampling", "--samples", "1,0"], "--samples 1,0"),
    "tune inpainting --sampler": (["tune", "inpainting", "--sampler", "ddimm"], "ddimm"),
    "tune inpainting --steps": (["tune", "inpainting", "--steps", "0"], "--steps 0"),
}


@pytest.mark.parametrize("case", SAMPLING)
def test_bad_sampling_flag(case, good, tmp_path, capsys):
    argv, name = SAMPLING[case]
    fails([*argv, "--model", good["model"], "--data", good["coco"], "--output", str(tmp_path / "out")],
          capsys, name)


@pytest.mark.parametrize("command", ["train", "quickstart", "tune schedules"])
@pytest.mark.parametrize("override,name", [("sampling.sampler=ddimm", "ddimm"),
                                           ("sampling.overlap_th=1.5", "sampling.overlap_th"),
                                           ("sampling.steps=0", "sampling.steps"),
                                           ("sampling.num_samples=0", "sampling.num_samples")])
def test_bad_sampling_config(command, override, name, good, tmp_path, capsys):
    fails(config_commands(good, tmp_path)[command](good["config"], [override]), capsys, name)


@pytest.mark.parametrize("command", ["train", "quickstart"])
def test_sigma_schedule_the_sampler_lacks(command, good, tmp_path, capsys):
    fails(config_commands(good, tmp_path)[command](good["config"], ["sampling.sampler=unipc",
                                                                    "sampling.sigma_schedule=lu"]), capsys, "not unipc")


def test_sampling_file_with_a_sigma_schedule_the_sampler_lacks(good, tmp_path, capsys):
    preset = tmp_path / "ddim_karras.yaml"
    preset.write_text("sampler: ddim\nsteps: 10\nsigma_schedule: karras\n")
    fails(["evaluate", "--sampling", str(preset), "--model", good["model"], "--data", good["coco"],
           "--output", str(tmp_path / "out")], capsys, "ddim has none")


# --------------------------------------------------------------------------------------------
# Row 7: s3:// paths without credentials
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No credentials anywhere boto looks (environment, files, instance metadata), no endpoint."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


S3 = "s3://bucket/prefix"
S3_COMMANDS = {
    "preprocess --source": lambda g, t: ["preprocess", "--source", S3, "--output", t],
    "preprocess --output": lambda g, t: ["preprocess", "--source", g["coco"], "--output", S3],
    "train --data": lambda g, t: ["train", "ae", "--data", S3, "--run-dir", t],
    "train --storage": lambda g, t: ["train", "ae", "--data", g["shards"], "--storage", S3, "--run-dir", t],
    "evaluate --model": lambda g, t: ["evaluate", "--model", S3, "--data", g["coco"], "--output", t],
    "evaluate --data": lambda g, t: ["evaluate", "--model", g["model"], "--data", S3, "--output", t],
    "tune sampling --data": lambda g, t: ["tune", "sampling", "--model", g["model"], "--data", S3, "--output", t],
    "tune schedules --data": lambda g, t: ["tune", "schedules", "--data", S3, "--ae", g["model"], "--output", t],
    "tune inpainting --model": lambda g, t: ["tune", "inpainting", "--model", S3, "--data", g["coco"], "--output", t],
    "synth OUT": lambda g, t: ["synth", S3],
    "validate FOLDER": lambda g, t: ["validate", S3],
}


@pytest.mark.parametrize("case", S3_COMMANDS)
def test_s3_without_credentials(case, good, tmp_path, no_aws, capsys):
    fails(S3_COMMANDS[case](good, str(tmp_path / "out")), capsys, S3, "AWS_ACCESS_KEY_ID", "AWS_ENDPOINT_URL")


def test_s3_with_credentials_or_endpoint_passes(no_aws, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    inputs.s3_credentials("--data", S3)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    inputs.s3_credentials("--data", S3)


def test_credential_error_matched_by_name():
    """botocore's NoCredentialsError is recognised by name (botocore need not be installed)."""
    NoCredentialsError = type("NoCredentialsError", (Exception,), {})
    assert "AWS_ACCESS_KEY_ID" in bad_input_message(NoCredentialsError("Unable to locate credentials"))


# --------------------------------------------------------------------------------------------
# Row 8: ldmseg synth OUT where OUT is an existing file
# --------------------------------------------------------------------------------------------


def test_synth_into_an_existing_file(tmp_path, capsys):
    out = tmp_path / "scenes"
    out.write_text("not a folder")
    fails(["synth", str(out)], capsys, str(out), "existing file")
    assert out.read_text() == "not a folder"


# --------------------------------------------------------------------------------------------
# The boundary: SystemExit messages, bugs keep their traceback, --debug
# --------------------------------------------------------------------------------------------


def test_system_exit_message_is_one_line_exit_2(good, tmp_path, capsys):
    line = fails(["tune", "inpainting", "--model", good["model"], "--data", good["coco"], "--kinds", "sparse,blobs",
                  "--output", str(tmp_path / "out")], capsys, "blobs")
    assert line.startswith("ldmseg tune inpainting: unknown mask kind")  # the message's own prefix not repeated
    fails(["tune", "schedules", "--data", good["shards"], "--ae", good["model"], "--eval-every", "0",
           "--output", str(tmp_path / "out")], capsys, "--eval-every")


def test_a_bug_keeps_its_traceback(good, tmp_path, monkeypatch):
    import pipelines.evaluate

    def buggy(*args, **kwargs):
        return {}["pq"]

    monkeypatch.setattr(pipelines.evaluate, "evaluate", buggy)
    with pytest.raises(KeyError):
        main(["evaluate", "--model", good["model"], "--data", good["coco"], "--output", str(tmp_path / "out")])


def test_debug_after_the_command_raises(tmp_path):
    with pytest.raises(inputs.InputError, match="no such folder"):
        main(["train", "ae", "--data", str(tmp_path / "typo"), "--debug"])


def test_console_script_one_line_and_debug(tmp_path):
    """The real entry point: one line and exit 2; ``ldmseg --debug COMMAND`` shows the traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = str(tmp_path / "typo")
    cmd = [sys.executable, "-m", "pipelines.cli"]
    plain = subprocess.run([*cmd, "evaluate", "--model", missing, "--data", missing], env=env, capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [f"ldmseg evaluate: --model {missing}: no such folder; pass a model "
                                                 "folder written by 'ldmseg train' (e.g. runs/quickstart/models/ldm) "
                                                 "or models:/NAME@ALIAS"]
    debug = subprocess.run([*cmd, "--debug", "evaluate", "--model", missing, "--data", missing], env=env,
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "InputError" in debug.stderr
