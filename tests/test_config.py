"""Config layering (defaults < YAML < env < overrides), errors naming the field, shipped YAMLs."""

from pathlib import Path

import pytest

from llmrec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_layers_in_order(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("eval:\n  n_users: 11\n  seed: 3\nlora:\n  r: 4\n")
    cfg = load_config(path)
    assert (cfg.eval.n_users, cfg.eval.seed, cfg.lora.r, cfg.eval.k) == (11, 3, 4, 10)
    monkeypatch.setenv("LLMREC_EVAL__N_USERS", "22")
    assert load_config(path).eval.n_users == 22
    assert load_config(path, ["eval.n_users=33"]).eval.n_users == 33
    assert load_config(path, ["eval.n_users=33"]).eval.seed == 3


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("eval.bogus=1", "eval.bogus"),
        ("lora.r=0", "lora.r"),
        ("model.quantization=fp4", "model.quantization"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["no-equals-sign"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_a_subclass_with_its_own_section_loads_the_same_way(tmp_path, monkeypatch):
    """An application (serving) adds a section; YAML, env, overrides and errors all apply."""
    from pydantic import BaseModel, Field

    from llmrec.config import AppConfig

    class Extra(BaseModel):
        port: int = Field(1, ge=1)
        host: str = "a"

    class WithExtra(AppConfig):
        extra: Extra = Extra()

    path = tmp_path / "run.yaml"
    path.write_text("extra:\n  port: 5\n  host: b\neval:\n  seed: 3\n")
    monkeypatch.setenv("LLMREC_EXTRA__HOST", "c")
    cfg = load_config(path, ["extra.port=6"], cls=WithExtra)
    assert isinstance(cfg, WithExtra)
    assert (cfg.extra.port, cfg.extra.host, cfg.eval.seed) == (6, "c", 3)
    with pytest.raises(ConfigError, match=r"extra\.port"):
        load_config(overrides=["extra.port=0"], cls=WithExtra)
    with pytest.raises(ConfigError, match="extra"):
        load_config(path)  # the plain AppConfig has no such section


def test_generic_data_needs_its_files():
    with pytest.raises(ConfigError, match="data.interactions"):
        load_config(overrides=["data.name=generic"])


@pytest.mark.parametrize("path", sorted((ROOT / "training" / "configs").glob("*.yaml")), ids=str)
def test_every_shipped_config_loads(path):
    load_config(path)
