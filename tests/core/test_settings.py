"""Settings are written once: the dataclasses generate the CLI and the rule flags, and every config key
they name exists in the schema with the same default."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest

from prefkd.core.settings import add_options, config_values, from_args, schema_defaults, setting, to_flags
from prefkd.errors import PrefkdError
from prefkd.io.config import load_schema
from prefkd.training.settings import SignalSettings, TrainSettings

# Config keys that only the workflow reads (they never reach a stage's CLI).
WORKFLOW_ONLY = {"signals.reference"}


@dataclasses.dataclass
class Example:
    name: str = setting(doc="a required string")
    count: int = setting(3, "a number", config="section.count")
    ratio: float = setting(0.5, "a fraction", config="{role}.ratio")
    mode: str = setting("a", "a choice", choices=("a", "b"))
    flag: bool = setting(False, "a switch", config="section.flag")
    items: list[str] = setting([], "several paths")
    maybe: str | None = setting(None, "optional")


def _parse(argv: list[str]) -> Example:
    parser = argparse.ArgumentParser()
    add_options(parser, Example)
    return from_args(Example, parser.parse_args(argv))


def test_options_are_generated_from_the_fields():
    s = _parse(["--name", "x", "--count", "7", "--flag", "--items", "a", "b", "--mode", "b"])
    assert s == Example(name="x", count=7, flag=True, items=["a", "b"], mode="b")
    assert _parse(["--name", "x"]) == Example(name="x")
    assert _parse(["--name", "x", "--items", "a", "--items", "b", "c"]).items == ["a", "b", "c"]  # repeatable
    with pytest.raises(SystemExit):
        _parse(["--count", "1"])  # --name is required
    with pytest.raises(SystemExit):
        _parse(["--name", "x", "--mode", "c"])  # not a choice


def test_flags_round_trip_through_the_generated_cli():
    values = {"name": "a b", "count": 4, "ratio": 0.25, "flag": False, "items": ["p q", "r"], "maybe": None}
    flags = to_flags(Example, values)
    assert "--maybe" not in flags and "--no-flag" in flags
    assert _parse(shlex.split(flags)) == Example(name="a b", count=4, ratio=0.25, flag=False, items=["p q", "r"])


def test_flags_follow_the_fields_not_the_order_of_the_values():
    """A config's key order must not change a job's params (Snakemake would rerun it)."""
    values = {"name": "a", "count": 4, "ratio": 0.25, "flag": True, "items": ["p"]}
    flags = to_flags(Example, values)
    assert to_flags(Example, dict(reversed(list(values.items())))) == flags
    assert flags.index("--name") < flags.index("--count") < flags.index("--items")


def test_unknown_setting_is_refused():
    with pytest.raises(PrefkdError, match="has no setting 'batch'"):
        to_flags(Example, {"batch": 1})


def test_config_values_follow_the_named_keys():
    config = {"section": {"count": 9, "flag": True}, "student": {"ratio": 0.1}}
    assert config_values(Example, config, role="student") == {"count": 9, "ratio": 0.1, "flag": True}
    with pytest.raises(PrefkdError, match="teacher.ratio"):
        config_values(Example, config, role="teacher")


def _schema_node(schema: dict, key: str) -> dict:
    node = schema
    for part in key.split("."):
        node = node["properties"][part]
    return node


@pytest.mark.parametrize("cls", [TrainSettings, SignalSettings])
def test_schema_defaults_equal_the_dataclass_defaults(cls):
    schema = load_schema()
    defaults = schema_defaults(cls)
    assert defaults, f"{cls.__name__} names no config key"
    for key, default in defaults.items():
        assert _schema_node(schema, key).get("default") == default, key


@pytest.mark.parametrize("section, cls", [("train", TrainSettings), ("signals", SignalSettings)])
def test_every_key_of_a_stage_section_is_one_setting(section, cls):
    schema = load_schema()
    named = {f.metadata.get("config") for f in dataclasses.fields(cls)}
    for key in schema["properties"][section]["properties"]:
        full = f"{section}.{key}"
        assert full in named or full in WORKFLOW_ONLY, f"{full} is neither a {cls.__name__} setting nor workflow-only"


def test_stage_sections_name_only_train_settings():
    """sft.<role>, contrastive.<direction> and their keys are passed by name to TrainSettings."""
    schema = load_schema()
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    for section in (
        schema["properties"]["sft"]["properties"]["teacher"],
        schema["properties"]["contrastive"]["properties"]["pos"],
    ):
        assert set(section["properties"]) - {"enabled"} <= fields
