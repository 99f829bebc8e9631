"""Typed, validated configs built from YAML files and command-line overrides.

The flow is ``load_yaml`` -> ``apply_overrides(data, parse_overrides(argv))`` -> ``from_dict(Cls, data)``.
Everything here is generic over any tree of dataclasses; the experiment's own config classes live
elsewhere. Every mistake a user can make raises ``ConfigError`` whose message says what to fix.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import inspect
import json
import math
import re
import reprlib
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user error in a config/override/file. The CLI prints str(err) (no traceback) and exits with status 2."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4``, ``3E5`` and ``1.0e5`` as floats, and refuses aliases.

    YAML 1.1 only treats a scalar as a float if it has a dot and a signed exponent, so plain
    ``lr: 1e-4`` would otherwise arrive as the string "1e-4" and fail type checking.
    """

    def compose_node(self, parent, index):
        # An alias is the same object again: nested aliases make a few hundred bytes into billions
        # of nodes once walked (the "billion laughs"), and a config is short enough to write out.
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"*{event.anchor} is a YAML alias: anchors and aliases (&name, *name) are not read here; "
                                              "write the values out where they are used", event.start_mark)
        return super().compose_node(parent, index)


def _construct_mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys, so "lr: 1e-4" written twice in a section would
    # silently run with the second value; a config with a repeated key is refused instead.
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise yaml.constructor.ConstructorError(None, None, "'<<' is a YAML merge key, which is not read here; write the keys out in this section", key_node.start_mark)
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key].start_mark.line + 1}); each key may appear once per section",
                key_node.start_mark,
            )
        if isinstance(key, typing.Hashable):
            seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates)

# YAML 1.1 also reads base-60 numbers (1:30 is 90, 1:30.0 is 90.0) and a leading 0 as octal (010
# is 8): a time or a zero-padded value would arrive as another number. Numbers here are decimal
# (with 0x/0b prefixes); those other forms stay strings, which type checking then refuses.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_OVERRIDE_FORMS = "accepted forms: key=value or --key=value, with dotted keys for sections (e.g. dpo.beta=0.2)"

# How a scalar type is named in "must be ..." messages.
_EXPECTED = {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}


def at_least_one(text: str) -> int:
    """An argparse type for counts such as --workers: a whole number >= 1 (argparse names the
    option and exits with status 2 otherwise)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def load_yaml(path: str | Path, allow_empty: bool = True) -> dict:
    """Read a YAML mapping from ``path``; an empty file (or one of comments only) counts as an empty
    mapping, or is refused where ``allow_empty`` is false (an experiment file that says nothing is
    more likely a file saved empty by mistake than a wish for every default)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"experiment file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); save it as UTF-8") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(f"invalid YAML in {path}{where}: {err.problem}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {err}") from None
    if data is None:
        if not allow_empty:
            raise ConfigError(f"{path} is empty; an experiment file holds config keys, e.g. 'base: quickstart' and 'method: dpo'")
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of config keys at the top level, got {_show(data)}")
    return data


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` / ``--key=value`` arguments into a flat ``{dotted_key: value}`` dict.

    Values are read as YAML (``3`` -> int, ``1e-4`` -> float, ``[1,2]`` -> list, ``null`` -> None,
    an empty value -> None). When a key repeats, the last one wins, as on most command lines.
    """
    overrides: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.removeprefix("--").partition("=")
        if not sep or not all(part.strip() == part and part for part in key.split(".")):
            raise ConfigError(f"bad override {arg!r}; {_OVERRIDE_FORMS}")
        try:
            overrides[key] = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or err
            raise ConfigError(f"cannot parse the value of override {arg!r}: {problem}") from None
    return overrides


def apply_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """Return a deep copy of ``data`` with each dotted key set, creating missing sections on the way."""
    result = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = result
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:  # absent, or an empty section ("dpo:" with nothing under it)
                child = node[part] = {}
            elif not isinstance(child, MutableMapping):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(f"cannot set '{dotted}': '{section}' is {_show(child)}, not a config section")
            node = child
        node[leaf] = copy.deepcopy(value)
    return result


def from_dict(cls: type[T], data: Mapping | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types; ``path`` names the section in errors."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:  # "section:" with nothing under it means "all defaults"
        data = {}
    if not isinstance(data, Mapping):
        where = f"config section '{path}'" if path else "the config"
        raise ConfigError(f"{where} must be a mapping of keys to values, got {_show(data)}")

    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = _closest(str(key), fields)
            hint = f" did you mean '{_join(path, close)}'?" if close else ""
            where = f"under '{path}'" if path else "at the top level"
            raise ConfigError(
                f"unknown config key '{_join(path, str(key))}';{hint} accepted keys {where}: {', '.join(fields)}"
            )

    hints = typing.get_type_hints(cls)  # resolves `from __future__ import annotations` strings
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], _over_field_default(f, data[name]), _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(path, name)}'")
    try:
        return cls(**kwargs)
    except ValueError as err:  # raised by __post_init__ validation: say which section it is about
        message = str(err)
        if path and path not in message:
            message = f"config section '{path}': {message}"
        raise ConfigError(message) from err


def _over_field_default(f: dataclasses.Field, value: Any) -> Any:
    """A section given in part (`dpo: {optim: {lr: 1.0e-4}}`) over the field's own default section
    (DPO's optimiser: warmup 0.1), not over its class's defaults (OptimConfig's: warmup 0.05): the
    keys not given keep the values `alignbench methods` shows. An empty section is the default one."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not (dataclasses.is_dataclass(default) and not isinstance(default, type)) or not (value is None or isinstance(value, Mapping)):
        return value
    return deep_merge(to_dict(default), value or {})


def deep_merge(base: dict, top: Mapping) -> dict:
    """`top` over `base`, section by section (an experiment file over its `base:`, a section given
    in part over its default). An empty section ("ppo:" with nothing under it) adds nothing, as an
    override of no key does."""
    merged = dict(base)
    for key, value in top.items():
        if value is None and isinstance(merged.get(key), dict):
            continue
        merged[key] = deep_merge(merged[key], value) if isinstance(value, Mapping) and isinstance(merged.get(key), dict) else value
    return merged


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and return it in that type (lists -> tuples etc.)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:  # Optional[X]: let X give its own, more specific message
            return _convert(members[0], value, key)
        for member in members:
            try:
                return _convert(member, value, key)
            except ConfigError:
                continue
        expected = " or ".join(_type_name(m) for m in members)
        raise ConfigError(f"config key '{key}' must be {expected}, got {_show(value)}")
    if origin is Literal:
        # Compare types too, so that true is not accepted for 1 nor 1 for 1.0.
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        hint = did_you_mean(value, [str(c) for c in args]) if isinstance(value, str) else ""
        choices = ", ".join(repr(c) for c in args)
        raise ConfigError(f"config key '{key}' must be one of {choices}; got {_show(value)}.{hint}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {_show(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[X, Y]
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' must be a list of {len(args)} items, got {len(value)}")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value))]
        return tuple(items) if (origin or tp) is tuple else items
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' must be a mapping, got {_show(value)}")
        key_type, value_type = args or (Any, Any)
        return {
            _convert(key_type, k, f"{key}.{k}"): _convert(value_type, v, f"{key}.{k}") for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # "lr: 1" means 1.0
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        # No setting means anything at .inf or .nan: a budget's "none" is null, not .inf.
        raise ConfigError(f"config key '{key}' must be a finite number, got {_show(value)}")
    if isinstance(tp, type):
        # bool is a subclass of int, but true/false for an integer is almost surely a mistake.
        if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
            return value
        raise ConfigError(f"config key '{key}' must be {_EXPECTED.get(tp, 'a ' + tp.__name__)}, got {_show(value)}")
    raise TypeError(f"unsupported config field type {tp!r} for '{key}'")


def to_dict(config: Any) -> Any:
    """A plain nested dict (lists for tuples) of a dataclass or mapping, ready for JSON or YAML."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to hashable leaves (lists become tuples)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = tuple(value) if isinstance(value, list) else value
    return flat


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable content hash of a dataclass or dict: sha256 of canonical JSON, independent of key order."""
    text = json.dumps(_canonical(to_dict(obj)), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def _canonical(value: Any) -> Any:
    """Normalise values so equal settings hash equally; json writes floats with repr, which round-trips exactly."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)  # JSON has no inf/nan
        return int(value) if value.is_integer() else value  # lr: 1 and lr: 1.0 are the same setting
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right after that field in the class body (base classes included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' docs
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # built-in, defined in a REPL, or source not parseable alone
        return {}
    node = tree.body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs = {}
    for stmt, following in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(following.value.value)
    return docs


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, doc) for every settable leaf field, recursing into sections.

    A required field's default is ``dataclasses.MISSING``.
    """
    return _describe(cls, prefix, None)


def _describe(cls: type, prefix: str, instance: Any) -> list[tuple[str, str, Any, str]]:
    # ``instance`` is the section's default object, when the parent's default supplies one, so that
    # `dpo: DPO = field(default_factory=lambda: DPO(beta=0.5))` reports beta=0.5, not the class default.
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        if instance is not None:
            default = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows += _describe(tp, key, default if dataclasses.is_dataclass(default) else None)
        else:
            rows.append((key, _type_name(tp), default, docs.get(f.name, "")))
    return rows


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` did you mean 'x'?`` for the closest choice, or "" when none is close; append it to a message."""
    close = _closest(name, choices)
    return f" did you mean '{close}'?" if close else ""


def _closest(name: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(choices), n=1)
    return matches[0] if matches else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _show(value: Any) -> str:
    """``'two' (str)``: the value, shortened, and its type, for "got ..." messages."""
    return f"{reprlib.repr(value)} ({type(value).__name__})"
