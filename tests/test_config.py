"""Tests for alignbench.config: building typed configs from YAML + overrides, and the errors users see."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from alignbench.config import (
    ConfigError,
    apply_overrides,
    config_hash,
    describe,
    did_you_mean,
    field_docs,
    from_dict,
    load_yaml,
    parse_overrides,
    to_dict,
)


@dataclass
class DPOConfig:
    beta: float = 0.1
    """Strength of the KL penalty towards the reference policy."""
    lr: float = 5e-7
    """Learning rate."""
    loss: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    """Which DPO loss variant to use."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


@dataclass
class SFTConfig:
    epochs: int = 1
    """Passes over the SFT data."""
    packing: bool = False
    max_len: Optional[int] = None
    layers: tuple[int, ...] = (0, 1)


@dataclass
class EvalConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.7])
    """Sampling temperatures to evaluate at."""
    seed: int | None = None
    extra: dict[str, int] = field(default_factory=dict)
    anything: Any = None


@dataclass
class ExperimentConfig:
    name: str = "run"
    """Name of the run."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(beta=0.5))
    eval: EvalConfig = field(default_factory=EvalConfig)


def build(data: dict | None = None, *args: str) -> ExperimentConfig:
    return from_dict(ExperimentConfig, apply_overrides(data or {}, parse_overrides(args)))


# --- building configs ----------------------------------------------------------------------------


def test_defaults_when_data_is_empty_or_none():
    assert from_dict(ExperimentConfig, None) == ExperimentConfig()
    cfg = from_dict(ExperimentConfig, {"dpo": None})  # "dpo:" with nothing under it
    assert cfg.dpo == DPOConfig(beta=0.5)  # the field's own default section, as if not given
    assert from_dict(ExperimentConfig, {}).dpo.beta == 0.5  # untouched section keeps the field default


def test_a_section_given_in_part_keeps_the_fields_own_defaults_for_the_rest():
    """`dpo: {optim: {lr: 1e-4}}` sets the learning rate of DPO's optimiser and nothing else: the
    keys not given keep DPO's defaults (those `alignbench methods` shows), not the optimiser class's.
    It once gave the quickstart's DPO OptimConfig's warmup 0.05 instead of DPO's 0.1."""
    cfg = from_dict(ExperimentConfig, {"dpo": {"lr": 1e-3}})
    assert cfg.dpo == DPOConfig(beta=0.5, lr=1e-3)
    with pytest.raises(ConfigError, match="unknown config key 'dpo.betta'"):
        from_dict(ExperimentConfig, {"dpo": {"betta": 0.2}})

    from alignbench.experiment import ExperimentConfig as Experiment
    from alignbench.experiment import load_experiment

    defaults = Experiment()
    assert load_experiment("quickstart").dpo.optim == dataclasses.replace(defaults.dpo.optim, lr=1.0e-4)
    assert load_experiment("quickstart", ["grpo.optim.lr=1e-4"]).grpo.optim == dataclasses.replace(defaults.grpo.optim, lr=1e-4)
    assert (defaults.grpo.optim.warmup_ratio, defaults.grpo.optim.schedule) == (0.0, "constant")  # not OptimConfig's 0.05, cosine


def test_nested_values_and_types():
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "x",
            "sft": {"epochs": 3, "packing": True, "max_len": 128, "layers": [2, 3]},
            "dpo": {"beta": 1, "loss": "ipo"},
            "eval": {"temperatures": [0.5, 1], "seed": 7, "extra": {"a": 1}, "anything": {"k": [1]}},
        },
    )
    assert cfg.sft == SFTConfig(epochs=3, packing=True, max_len=128, layers=(2, 3))
    assert cfg.dpo.beta == 1.0 and isinstance(cfg.dpo.beta, float)  # ints are accepted as floats
    assert cfg.dpo.lr == 5e-7 and cfg.dpo.loss == "ipo"
    assert cfg.eval.temperatures == [0.5, 1.0] and all(isinstance(t, float) for t in cfg.eval.temperatures)
    assert cfg.eval.seed == 7 and cfg.eval.extra == {"a": 1} and cfg.eval.anything == {"k": [1]}


def test_unknown_key_suggests_closest_and_lists_accepted():
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"dpo": {"betta": 0.2}})
    assert str(err.value) == (
        "unknown config key 'dpo.betta'; did you mean 'dpo.beta'? accepted keys under 'dpo': beta, lr, loss"
    )
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'; accepted keys at the top level: name, sft"):
        from_dict(ExperimentConfig, {"zzz": 1})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sft": {"epochs": "two"}}, "config key 'sft.epochs' must be an integer, got 'two' (str)"),
        ({"sft": {"epochs": True}}, "config key 'sft.epochs' must be an integer, got True (bool)"),
        ({"sft": {"packing": 1}}, "config key 'sft.packing' must be a boolean (true or false), got 1 (int)"),
        ({"sft": {"packing": "yes"}}, "config key 'sft.packing' must be a boolean (true or false), got 'yes' (str)"),
        ({"name": 3}, "config key 'name' must be a string, got 3 (int)"),
        ({"dpo": {"lr": "fast"}}, "config key 'dpo.lr' must be a number, got 'fast' (str)"),
        ({"eval": {"temperatures": 0.7}}, "config key 'eval.temperatures' must be a list, got 0.7 (float)"),
        ({"eval": {"temperatures": [0.7, "hot"]}}, "config key 'eval.temperatures[1]' must be a number"),
        ({"eval": {"extra": {"a": "b"}}}, "config key 'eval.extra.a' must be an integer"),
        ({"eval": {"seed": "x"}}, "config key 'eval.seed' must be an integer, got 'x' (str)"),
        ({"sft": 5}, "config section 'sft' must be a mapping of keys to values, got 5 (int)"),
    ],
)
def test_wrong_types_name_key_expected_and_actual(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, data)
    assert str(err.value).startswith(message)


def test_optional_accepts_none():
    assert from_dict(SFTConfig, {"max_len": None}).max_len is None
    assert from_dict(EvalConfig, {"seed": None}).seed is None


def test_bad_literal_names_accepted_values():
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"dpo": {"loss": "sigmod"}})
    message = str(err.value)
    assert "config key 'dpo.loss' must be one of 'sigmoid', 'hinge', 'ipo'" in message
    assert "'sigmod'" in message and "did you mean 'sigmoid'?" in message


def test_post_init_error_gets_section_path():
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, {"dpo": {"beta": -1}})
    assert str(err.value) == "config section 'dpo': beta must be positive, got -1.0"
    assert isinstance(err.value.__cause__, ValueError)


def test_missing_required_field():
    @dataclass
    class Needs:
        model: str

    with pytest.raises(ConfigError, match="missing required config key 'model'"):
        from_dict(Needs, {})


# --- YAML files ----------------------------------------------------------------------------------


def test_an_empty_section_in_a_file_keeps_its_bases_section(tmp_path):
    """`ppo:` with nothing under it in a file built on a base adds nothing, as an override of no key
    does; it once replaced the base's whole section with the defaults."""
    from alignbench.experiment import load_experiment

    (tmp_path / "base.yaml").write_text("name: b\nmethods: [ppo]\nppo:\n  iterations: 7\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\nppo:\n")
    assert load_experiment(str(tmp_path / "top.yaml")).ppo.iterations == 7


def test_load_yaml_reads_mapping_and_scientific_floats(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: demo\ndpo:\n  lr: 1e-4\n  beta: 3E5\n")
    data = load_yaml(path)
    assert data == {"name": "demo", "dpo": {"lr": 1e-4, "beta": 3e5}}
    assert from_dict(ExperimentConfig, data).dpo.lr == 1e-4


def test_base_60_and_leading_zero_octal_numbers_stay_text_and_are_refused_naming_the_key(tmp_path):
    """YAML 1.1 reads 1:30 as 90 and 010 as 8: a value such a reader changes is refused instead."""
    parsed = parse_overrides(["a=1:30", "b=1:30.0", "c=010", "d=0x10", "e=0b11", "f=1_000", "g=0", "h=-7"])
    assert parsed == {"a": "1:30", "b": "1:30.0", "c": "010", "d": 16, "e": 3, "f": 1000, "g": 0, "h": -7}
    path = tmp_path / "exp.yaml"
    path.write_text("dpo:\n  beta: 1:30\n")
    with pytest.raises(ConfigError, match="dpo.beta.*must be a number"):
        from_dict(ExperimentConfig, load_yaml(path))


def test_load_yaml_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"experiment file not found: {path}"


def test_load_yaml_malformed_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\ndpo:\n  beta: [0.1, 0.2\n  lr: 3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert str(path) in message and "line 4, column" in message and "expected ',' or ']'" in message


def test_load_yaml_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_load_yaml_refuses_aliases_and_merge_keys_naming_the_line(tmp_path):
    """Nested aliases ("billion laughs") turn a few hundred bytes into billions of nodes once walked;
    a config is refused at its first alias, at once, with where it is and what to write instead."""
    path = tmp_path / "bomb.yaml"
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path.write_text("\n".join([*levels, "trainer:", "  devices: *a9", ""]))
    with pytest.raises(ConfigError, match=r"bomb.yaml, line 2, column \d+: \*a0 is a YAML alias: anchors and aliases \(&name, \*name\) are not read here"):
        load_yaml(path)
    path.write_text("common: &common {beta: 0.1}\ndpo:\n  <<: *common\n")
    with pytest.raises(ConfigError, match="alias"):
        load_yaml(path)
    path.write_text("dpo:\n  <<: {beta: 0.1}\n  lr: 3\n")
    with pytest.raises(ConfigError, match=r"line 2, .*'<<' is a YAML merge key, which is not read here; write the keys out"):
        load_yaml(path)


def test_load_yaml_refuses_a_key_repeated_in_one_section(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: demo\ndpo:\n  beta: 0.1\n  lr: 3\n  beta: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert str(path) in message and "line 5" in message and "duplicate key 'beta' (first on line 3)" in message
    # the same key in two different sections is fine
    path.write_text("dpo:\n  beta: 0.1\ncpl:\n  beta: 0.2\n")
    assert load_yaml(path) == {"dpo": {"beta": 0.1}, "cpl": {"beta": 0.2}}


def test_load_yaml_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path} is not UTF-8 text (byte 9: b'\\xe9'); save it as UTF-8"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused_with_the_key(value):
    data = apply_overrides({}, parse_overrides([f"dpo.lr={value}"]))
    with pytest.raises(ConfigError) as err:
        from_dict(ExperimentConfig, data)
    assert str(err.value).startswith("config key 'dpo.lr' must be a finite number, got ")


# --- overrides -----------------------------------------------------------------------------------


def test_both_override_forms_give_identical_results():
    plain = ["dpo.beta=0.2", "sft.epochs=3", "eval.temperatures=[0.7,1.0]", "name=abc"]
    dashed = ["--" + arg for arg in plain]
    assert parse_overrides(plain) == parse_overrides(dashed)
    assert build({}, *plain) == build({}, *dashed)
    assert build({}, *plain).dpo.beta == 0.2


def test_override_values_are_typed():
    parsed = parse_overrides(
        ["a=3", "b=1e-4", "c=3E5", "d=-2.5e+3", "e=true", "f=[1,2]", "g=null", "h=text", "i='1e-4'", "j=x=y"]
    )
    assert parsed == {
        "a": 3, "b": 1e-4, "c": 3e5, "d": -2500.0, "e": True, "f": [1, 2],
        "g": None, "h": "text", "i": "1e-4", "j": "x=y",
    }  # fmt: skip
    assert isinstance(parsed["b"], float) and isinstance(parsed["c"], float)


def test_same_key_twice_last_wins():
    assert parse_overrides(["x=1", "--x=2"]) == {"x": 2}


@pytest.mark.parametrize("arg", ["dpo.beta", "--dpo.beta", "=3", "dpo..beta=1", "--=1"])
def test_bad_override_form_names_it_and_shows_forms(arg):
    with pytest.raises(ConfigError) as err:
        parse_overrides([arg])
    assert repr(arg) in str(err.value) and "key=value or --key=value" in str(err.value)


def test_unparseable_override_value():
    with pytest.raises(ConfigError, match=r"cannot parse the value of override 'x=\[1,2'"):
        parse_overrides(["x=[1,2"])


def test_apply_overrides_creates_sections_and_copies():
    data = {"dpo": {"beta": 0.1}, "sft": None}
    out = apply_overrides(data, {"dpo.lr": 1e-5, "sft.epochs": 2, "eval.temperatures": [1.0], "name": "n"})
    assert out == {"dpo": {"beta": 0.1, "lr": 1e-5}, "sft": {"epochs": 2}, "eval": {"temperatures": [1.0]}, "name": "n"}
    assert data == {"dpo": {"beta": 0.1}, "sft": None}  # input untouched
    with pytest.raises(ConfigError, match="cannot set 'name.x': 'name' is 'n' \\(str\\), not a config section"):
        apply_overrides(out, {"name.x": 1})


def test_list_override_through_to_config():
    cfg = build({"eval": {"temperatures": [0.1]}}, "eval.temperatures=[0.7,1]", "sft.layers=[4]")
    assert cfg.eval.temperatures == [0.7, 1.0] and cfg.sft.layers == (4,)


def test_override_unknown_key_is_reported_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'dpo.beta'"):
        build({}, "--dpo.betta=0.3")


# --- serialisation and hashing -------------------------------------------------------------------


def test_to_dict_roundtrips_and_uses_lists():
    cfg = ExperimentConfig()
    data = to_dict(cfg)
    assert data["sft"]["layers"] == [0, 1] and data["dpo"]["beta"] == 0.5
    assert from_dict(ExperimentConfig, data) == cfg


def test_config_hash_is_stable_and_content_sensitive():
    a = {"x": 1, "y": {"p": 0.1, "q": [1, 2]}}
    b = {"y": {"q": [1, 2], "p": 0.1}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 12 and len(config_hash(a, length=20)) == 20
    assert config_hash(a) != config_hash({**a, "x": 2})
    assert config_hash({"lr": 1e-4}) != config_hash({"lr": 1.0001e-4})
    assert config_hash({"lr": 1}) == config_hash({"lr": 1.0})  # same setting, same hash
    cfg = ExperimentConfig()
    assert config_hash(cfg) == config_hash(to_dict(cfg)) == config_hash(ExperimentConfig())
    assert config_hash(cfg) != config_hash(build({}, "dpo.beta=0.6"))


# --- documentation -------------------------------------------------------------------------------


def test_field_docs_reads_docstrings():
    assert field_docs(DPOConfig) == {
        "beta": "Strength of the KL penalty towards the reference policy.",
        "lr": "Learning rate.",
        "loss": "Which DPO loss variant to use.",
    }
    assert field_docs(SFTConfig) == {"epochs": "Passes over the SFT data."}  # undocumented fields absent


def test_field_docs_include_base_classes_and_survive_missing_source():
    @dataclass
    class Child(DPOConfig):
        extra: int = 0
        """An extra knob."""

    assert field_docs(Child)["beta"].startswith("Strength") and field_docs(Child)["extra"] == "An extra knob."
    namespace: dict = {}
    exec("from dataclasses import dataclass\n@dataclass\nclass NoSource:\n    x: int = 1\n    'doc'\n", namespace)
    assert field_docs(namespace["NoSource"]) == {}


def test_describe_covers_nested_fields():
    rows = {key: (type_name, default, doc) for key, type_name, default, doc in describe(ExperimentConfig)}
    assert list(rows)[:2] == ["name", "sft.epochs"]
    assert set(rows) == {
        "name", "sft.epochs", "sft.packing", "sft.max_len", "sft.layers", "dpo.beta", "dpo.lr", "dpo.loss",
        "eval.temperatures", "eval.seed", "eval.extra", "eval.anything",
    }  # fmt: skip
    assert rows["name"] == ("str", "run", "Name of the run.")
    assert rows["dpo.beta"] == ("float", 0.5, "Strength of the KL penalty towards the reference policy.")
    assert rows["dpo.loss"][0] == "Literal['sigmoid', 'hinge', 'ipo']"
    assert rows["eval.temperatures"][:2] == ("list[float]", [0.7])
    assert rows["sft.max_len"][0] == "Optional[int]" and rows["eval.seed"][0] == "int | None"
    assert describe(DPOConfig, prefix="dpo")[0][:3] == ("dpo.beta", "float", 0.1)

    @dataclass
    class Needs:
        model: str

    assert describe(Needs) == [("model", "str", dataclasses.MISSING, "")]


def test_did_you_mean():
    assert did_you_mean("dpp", ["dpo", "sft", "ppo"]) in (" did you mean 'dpo'?", " did you mean 'ppo'?")
    assert did_you_mean("simpo", ["simpo_v2", "orpo"]) == " did you mean 'simpo_v2'?"
    assert did_you_mean("zzzz", ["dpo", "sft"]) == ""
