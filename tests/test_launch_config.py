"""JobConfig: TOML loading, command-line overrides, errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest

from synthpipe.engine.config import TrainConfig
from synthpipe.launch.config import ENGINE_DEFAULTS, FLAGS, JobConfig, field_docs, load_config, train_options


def write(tmp_path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_documented_main_job():
    cfg = load_config(None, {})
    assert cfg == JobConfig()
    assert (cfg.model, cfg.data, cfg.n_stages, cfg.gradients, cfg.staleness, cfg.num_samples, cfg.batch_size) == \
        ("wide_mlp", "mnist1d", 2, "delayed", "predict", 20000, 256)
    assert cfg.compare_backprop and cfg.progress and cfg.device == "auto" and cfg.backend is None


def test_every_field_is_documented():
    engine = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(JobConfig):
        doc = TrainConfig.__doc__ if f.name in engine else JobConfig.__doc__
        assert f"{f.name}:" in doc, f"field {f.name} is not documented"


def test_the_engine_options_are_the_train_config_fields():
    engine = [f.name for f in dataclasses.fields(TrainConfig)]
    job = [f.name for f in dataclasses.fields(JobConfig)]
    assert job[:len(engine)] == engine  # inherited: one name and one default each
    # one default each: the engine's, but for the main job's gradient source (ENGINE_DEFAULTS)
    resolved = {**ENGINE_DEFAULTS, "staleness": "predict"}  # "auto" with delayed: weight prediction
    assert {n: getattr(JobConfig(), n) for n in engine} == {**dataclasses.asdict(TrainConfig()), **resolved}
    assert set(ENGINE_DEFAULTS) == {"gradients", "staleness"}
    options = train_options(load_config(None, {"gradients": "backprop", "stall_warning": None, "delay": 1}))
    assert TrainConfig(**options) == TrainConfig(gradients="backprop", stall_warning=None, delay=1)  # staleness: None


def test_staleness_auto_follows_the_gradient_source():
    assert JobConfig().gradients == "delayed" and JobConfig().staleness == "predict"
    assert load_config(None, {"gradients": "synthetic"}).staleness is None  # (predict would be refused)
    assert load_config(None, {"gradients": "delayed", "staleness": "lr"}).staleness == "lr"
    assert load_config(None, {"staleness": None}).staleness is None  # delayed, uncorrected
    with pytest.raises(ValueError, match="staleness='predict' is not a correction of gradients='local'"):
        load_config(None, {"gradients": "local", "staleness": "predict"})


def test_every_engine_flag_takes_its_help_from_the_field_doc():
    docs = field_docs(TrainConfig)
    by_field = {f.field: f for f in FLAGS}
    for f in dataclasses.fields(TrainConfig):
        flag = by_field[f.name]
        assert flag.flag == "--" + f.name.replace("_", "-")
        assert flag.help and flag.help.replace("%%", "%") in docs[f.name].replace("``", ""), f.name


def test_field_docs_reads_the_attributes_section():
    class Example:
        """Title.

        Attributes:
            a: first line
                continued.
            b, c: shared.

        Raises:
            x: not a field.
        """

    assert field_docs(Example) == {"a": "first line continued.", "b": "shared.", "c": "shared."}


def test_engine_checks_are_the_engine_s(tmp_path):
    # One check: the launcher reports exactly the engine's message.
    for bad in ({"failure_timeout": 0.5}, {"stall_warning": 0.0}, {"max_inflight": 0}, {"nonfinite": "ignore"}):
        with pytest.raises(ValueError) as job_error:
            load_config(None, bad)
        with pytest.raises(ValueError) as engine_error:
            TrainConfig(**bad)
        assert str(job_error.value) == str(engine_error.value)


def test_stall_warning_off_is_none(tmp_path):
    assert load_config(write(tmp_path, 'stall_warning = "off"\n'), {}).stall_warning is None
    assert load_config(None, {"stall_warning": None}).stall_warning is None


def test_toml_file_is_loaded(tmp_path):
    path = write(tmp_path, """
model = "deep_mlp"
depth = 4
hidden = 32
data = "synthetic"
features = 16
epochs = 3
lr = 1            # an integer is a valid float
balance = [3, 3, 3]
conditional = false
delay = 2
backend = "auto"  # same as leaving it out
checkpoint = "ckpt"
""")
    cfg = load_config(path, {})
    assert (cfg.model, cfg.depth, cfg.hidden, cfg.data, cfg.features, cfg.epochs) == \
        ("deep_mlp", 4, 32, "synthetic", 16, 3)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.balance == [3, 3, 3] and cfg.n_stages == 3
    assert cfg.conditional is False and cfg.delay == 2 and cfg.backend is None and cfg.checkpoint == "ckpt"
    assert cfg.batch_size == JobConfig().batch_size  # untouched fields keep their defaults


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, 'epochs = 3\nlr = 0.01\nmodel = "paper_cnn"\n')
    cfg = load_config(path, {"epochs": 7, "conditional": False})
    assert cfg.epochs == 7 and cfg.conditional is False
    assert cfg.lr == 0.01 and cfg.model == "paper_cnn"  # not overridden


def test_a_balance_sets_the_number_of_stages_unless_given():
    assert load_config(None, {"balance": [5, 5]}).n_stages == 2
    with pytest.raises(ValueError, match="balance"):
        load_config(None, {"balance": [5, 5], "n_stages": 3})


def test_unknown_key_is_named_with_the_valid_keys(tmp_path):
    path = write(tmp_path, "epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(ValueError) as err:
        load_config(path, {})
    message = str(err.value)
    assert "learning_rate" in message and "lr" in message and "synth_lr" in message
    with pytest.raises(ValueError, match="nproc"):
        load_config(None, {"nproc": 2})


@pytest.mark.parametrize("line, key", [
    ('epochs = "ten"', "epochs"),
    ("conditional = 1", "conditional"),
    ("lr = true", "lr"),
    ('balance = [2, "x"]', "balance"),
    ("model = 3", "model"),
    ("[model]\nname = 'paper_mlp'", "model"),
])
def test_wrong_type_is_named(tmp_path, line, key):
    with pytest.raises(ValueError, match=key):
        load_config(write(tmp_path, line + "\n"), {})


def test_wrong_override_type_is_named():
    with pytest.raises(ValueError, match="batch_size"):
        load_config(None, {"batch_size": 1.5})


@pytest.mark.parametrize("overrides, key", [
    ({"model": "resnet"}, "model"), ({"device": "tpu"}, "device"), ({"backend": "mpi"}, "backend"),
    ({"batch_size": 0}, "batch_size"), ({"failure_timeout": 0.5}, "failure_timeout"), ({"lr": -1.0}, "lr"),
    ({"synth_replay": 0}, "synth_replay must be >= 1"),
    ({"checkpoint_every": 5}, "checkpoint_every needs a checkpoint directory"),
    ({"checkpoint": "ck", "checkpoint_every": 0}, "checkpoint_every must be >= 1"),
])
def test_bad_values_are_named(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, overrides)


def test_invalid_or_missing_file(tmp_path):
    with pytest.raises(ValueError, match="TOML"):
        load_config(write(tmp_path, "epochs = = 3\n"), {})
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), {})
