import pytest

from train_minimal.config import ConfigError, TrainConfig, build_config, parse_override


def test_defaults_validate():
    cfg = build_config()
    assert isinstance(cfg, TrainConfig) and cfg.model.path == "tiny"


def test_overrides_typed():
    cfg = build_config(overrides=["grpo.lr=3e-4", "rollout.group_size=4", "name=x", "grpo.scale_rewards=false"])
    assert cfg.grpo.lr == 3e-4 and cfg.rollout.group_size == 4 and cfg.name == "x"
    assert cfg.grpo.scale_rewards is False


def test_int_is_accepted_for_float():
    assert build_config(overrides=["grpo.lr=1"]).grpo.lr == 1.0


@pytest.mark.parametrize("override, needle", [
    ("grpo.lrr=1e-4", "unknown config key 'grpo.lrr' (did you mean 'grpo.lr'?)"),
    ("grpo.lr=abc", "grpo.lr: expected a number, got str 'abc'"),
    ("rollout.group_size=2.5", "rollout.group_size: expected int"),
    ("rollout.backend=tpu", "rollout.backend: expected one of ['hf', 'vllm']"),
    ("grpo=3", "grpo: expected a table"),
    ("rollout.group_size=1", "at least 2 rollouts"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_config_is_one_line_error(override, needle):
    with pytest.raises(ConfigError) as exc:
        build_config(overrides=[override])
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_file_toml_and_yaml(tmp_path):
    t = tmp_path / "c.toml"
    t.write_text('name = "a"\n[grpo]\nlr = 2e-4\n')
    assert build_config(file=t).grpo.lr == 2e-4
    y = tmp_path / "c.yaml"
    y.write_text("name: b\nrollout:\n  group_size: 4\n")
    assert build_config(file=y).rollout.group_size == 4
    bad = tmp_path / "bad.toml"
    bad.write_text("[grpo\nlr=1")
    with pytest.raises(ConfigError, match="bad.toml"):
        build_config(file=bad)
    with pytest.raises(ConfigError, match="cannot read"):
        build_config(file=tmp_path / "missing.toml")


def test_parse_override_string_fallback():
    assert parse_override("model.path=/some/dir") == {"model": {"path": "/some/dir"}}
