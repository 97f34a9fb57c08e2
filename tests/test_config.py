import yaml
import pytest

from influcoder.config import Config, ConfigError, load_config, template


def test_template_is_complete_and_loads_to_defaults():
    text = template()
    assert Config.model_validate(yaml.safe_load(text)) == Config()
    # every field is documented
    assert "# Sketch dimension d." in text
    assert text.count("\n# ") + text.count("  # ") >= 40


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("gradients:\n  dimm: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "gradients.dimm" in msg and "did you mean 'dim'" in msg


def test_wrong_type_names_key_and_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  lora:\n    rank: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "model.lora.rank" in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_are_typed_and_validated(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("gradients:\n  dim: 1024\n")
    cfg = load_config(p, ["gradients.dim=64", "model.lora.target_modules=[q_proj]", "data.limit=null", "model.name=random:llama"])
    assert cfg.gradients.dim == 64 and cfg.model.lora.target_modules == ["q_proj"]
    assert cfg.data.limit is None and cfg.model.name == "random:llama"
    with pytest.raises(ConfigError, match="student.bse"):
        load_config(p, ["student.bse=x"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(p, ["gradients.dim"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(p, ["gradients.dim.x=1"])


def test_choices_are_enforced():
    with pytest.raises(ConfigError, match="gradients.sketch"):
        load_config(None, ["gradients.sketch=fourier"])


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "smollm2-dolly.yaml"])
def test_shipped_configs_load(root, name):
    cfg = load_config(root / "configs" / name)
    assert cfg.name
