"""Config validation with one-sentence errors that name the key and what is allowed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import jsonschema
import yaml

from prefkd.core.methods import METHODS
from prefkd.core.weights import AGGREGATIONS, TRANSFORMS
from prefkd.errors import PrefkdError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"

_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def load_schema(path: str | Path = DEFAULT_SCHEMA) -> dict:
    """The config schema, with the allowed names that the library defines once filled in: the student
    methods (``prefkd.core.methods``) and the weight transforms and aggregations (``prefkd.core.weights``)."""
    with open(path, encoding="utf-8") as fh:
        schema = yaml.safe_load(fh)
    props = schema["properties"]
    props["distill"]["properties"]["methods"]["items"]["enum"] = ["all", *METHODS]
    props["signals"]["properties"]["transform"]["enum"] = list(TRANSFORMS)
    props["signals"]["properties"]["aggregation"]["enum"] = list(AGGREGATIONS)
    return schema


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe_type(t) -> str:
    types = t if isinstance(t, list) else [t]
    return " or ".join(_TYPE_WORDS.get(x, x) for x in types)


def _sentence(error: jsonschema.ValidationError) -> str:
    key = _key(error.absolute_path)
    v, schema, inst = error.validator, error.schema, error.instance
    if v == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(inst) - set(allowed))
        where = f"under '{key}'" if error.absolute_path else "at the top level"
        full = ".".join([*map(str, error.absolute_path), extra[0]])
        return f"config key '{full}' is not allowed; allowed keys {where} are: {', '.join(allowed)}."
    if v == "required":
        missing = [k for k in schema.get("required", []) if k not in inst]
        full = ".".join([*map(str, error.absolute_path), missing[0]])
        return f"config key '{full}' is required but missing."
    if v == "type":
        return f"config key '{key}' must be {_describe_type(schema['type'])}, got {inst!r}."
    if v == "enum":
        return f"config key '{key}' must be one of {', '.join(map(str, schema['enum']))}; got {inst!r}."
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[v]
        return f"config key '{key}' must be {op} {schema[v]}, got {inst!r}."
    if v == "pattern":
        return f"config key '{key}' must match the pattern {schema['pattern']}, got {inst!r}."
    if v in ("minLength", "minItems"):
        return f"config key '{key}' must not be empty."
    if v == "oneOf" and error.context:  # a number or a list of numbers: name what the value's own form breaks
        closer = [e for e in error.context if e.validator != "type"]
        if closer:
            return _sentence(min(closer, key=lambda e: len(e.absolute_path)))
        forms = [_describe_type(s.get("type")) for s in schema["oneOf"] if s.get("type")]
        return f"config key '{key}' must be {' or '.join(forms)}, got {inst!r}."
    if v == "not" and "enum" in schema.get("not", {}):
        return f"config key '{key}' must not use the name {inst!r}; reserved names are: {', '.join(schema['not']['enum'])}."
    return f"config key '{key}' is invalid: {error.message}."


def _fill_defaults(instance, schema) -> None:
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance and isinstance(sub, dict):
            _fill_defaults(instance[name], sub)


def validate_config(config: dict, schema_path: str | Path = DEFAULT_SCHEMA) -> dict:
    """Return a validated copy of ``config`` with defaults filled in; raise PrefkdError otherwise."""
    if not isinstance(config, dict) or not config:
        raise PrefkdError(
            "the config is empty; pass a config file with --configfile or keep config.yaml in the project root."
        )
    _check_finite(config)  # first: NaN passes every range check, and -inf would be reported as out of range
    if isinstance(config.get("train"), dict) and "accelerate" in config["train"]:
        raise PrefkdError(
            "config key 'train.accelerate' has moved: set 'resources.teacher.accelerate' and "
            "'resources.student.accelerate' (each kind of training stage has its own resources)."
        )
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(
        validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)))
    )
    if errors:
        raise PrefkdError(_sentence(errors[0]))
    config = copy.deepcopy(config)
    _fill_defaults(config, schema)
    _check_relations(config)
    return config


def _check_finite(node, path: tuple = ()) -> None:
    """Every number in the config is finite (YAML's .nan / .inf pass the schema's range checks)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_finite(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_finite(v, (*path, i))
    elif isinstance(node, float) and not math.isfinite(node):
        raise PrefkdError(f"config key '{_key(path)}' must be a finite number, got {node}.")


def _check_relations(config: dict) -> None:
    """Constraints between keys, which the schema cannot state."""
    tok = config["tokenize"]
    if tok["max_prompt_length"] >= tok["max_length"]:
        raise PrefkdError(
            f"config key 'tokenize.max_prompt_length' must be smaller than tokenize.max_length ({tok['max_length']}), "
            f"got {tok['max_prompt_length']}."
        )
    data = config["data"]
    if data["valid_fraction"] + data["test_fraction"] >= 1:
        raise PrefkdError(
            "config keys 'data.valid_fraction' + 'data.test_fraction' must leave rows for training (sum < 1)."
        )
    if config["seeds"] is not None and config["seed"] not in config["seeds"]:
        raise PrefkdError(
            f"config key 'seeds' must hold the experiment's seed ({config['seed']}): its runs are the students that "
            f"every single-seed number refers to; got {config['seeds']}."
        )
    unknown = sorted(set(config["distill"]["lrs"]) - set(config["distill"]["methods"]) - {"all"})
    if unknown and "all" not in config["distill"]["methods"]:
        raise PrefkdError(
            f"config key 'distill.lrs' names {', '.join(unknown)}, which distill.methods does not train; "
            f"add it to distill.methods or drop its learning rate."
        )
    sig = config["signals"]
    if sig["lower"] > sig["upper"]:
        raise PrefkdError(
            f"config key 'signals.lower' ({sig['lower']}) must not exceed 'signals.upper' ({sig['upper']}): "
            f"they are the clamp [L, U] of the span weights."
        )


def noise_levels(config: dict) -> list[float]:
    """The label-noise levels of a validated config: ``data.label_noise`` as a list (one level: a plain run)."""
    value = config["data"]["label_noise"]
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


def single_level(config: dict) -> dict:
    """The config of one experiment: a one-element label-noise list is its level; several levels are a study,
    which one Snakemake run cannot hold (one sentence says how to run it)."""
    levels = noise_levels(config)
    if len(levels) > 1:
        raise PrefkdError(
            f"data.label_noise lists {len(levels)} levels, a study axis with one experiment per level: run "
            f"`prefkd study --configfile <your config>`, which runs each level and writes results/{config['experiment']}/study.md."
        )
    config["data"]["label_noise"] = levels[0]
    return config


def load_config(path: str | Path, schema_path: str | Path = DEFAULT_SCHEMA) -> dict:
    with open(path, encoding="utf-8") as fh:
        return validate_config(yaml.safe_load(fh), schema_path)
