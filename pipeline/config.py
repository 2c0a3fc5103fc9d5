"""Stage configuration: dataclasses filled from a YAML file and command-line flags.

Every stage's settings are one dataclass with defaults. A job spec names them as
flags in its entrypoint (``s2 preprocess --input s3://... --resolutions 256,512``);
``--config FILE`` may hold the same keys as YAML. Unknown keys and flags are
errors that name the key and list the valid ones, raised before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(tp: Any, text: str, key: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {text!r}")
    try:
        return tp(text)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {text!r}") from exc


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a flag string) to the field type ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str):
            items: list[Any] = [v for v in (p.strip() for p in value.split(",")) if v]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(items)}")
            return tuple(coerce(a, v, key) for a, v in zip(args, items))
        inner = args[0] if args else str
        out = [coerce(inner, v, key) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: expected a JSON object, got {value!r}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if isinstance(value, str):
        return _parse_scalar(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def check_choices(obj: Any) -> None:
    """Every ``Literal`` field of a dataclass instance holds one of its choices: the check ``from_dict`` makes on
    the values it reads, for an object built in code."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        tp, _ = _unwrap_optional(tp)
        value = getattr(obj, name, None)
        if typing.get_origin(tp) is typing.Literal and value is not None and value not in typing.get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys are a ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    values = {k: coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


class _HelpFormatter(argparse.HelpFormatter):
    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            return ", ".join(f"{o} [true|false]" if not o.startswith("--no-") else o for o in action.option_strings)
        return super()._format_action_invocation(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments may be added on first use: ``later(build)``.

    ``s2 --help`` lists the subcommands without importing what their flags are made from (torch, Ray);
    a subcommand's ``build(parser)`` runs when that subcommand is parsed or its help is shown.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._later: list[Any] = []

    def later(self, build: Any) -> "Parser":
        self._later.append(build)
        return self

    def _build(self) -> None:
        while self._later:
            self._later.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        self._build()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._build()
        return super().format_help()

    def format_usage(self) -> str:
        self._build()
        return super().format_usage()


def later(parser: argparse.ArgumentParser, build: Any) -> None:
    """Run ``build(parser)`` on first use of ``parser`` (at once when it is a plain ArgumentParser)."""
    if isinstance(parser, Parser):
        parser.later(build)
    else:
        build(parser)


class BoolFlag(argparse.Action):
    """``--x`` / ``--no-x``; ``--x true|false`` (and yes/no, on/off, 1/0) is accepted too."""

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None,
                 **_: Any) -> None:
        names = [n for o in option_strings for n in ((o, "--no-" + o[2:]) if o.startswith("--") else (o,))]
        super().__init__(names, dest, nargs="?", default=default, help=help, metavar="true|false")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        negative = bool(option_string and option_string.startswith("--no-"))
        if values is None:
            setattr(namespace, self.dest, not negative)
            return
        if negative:
            parser.error(f"{option_string} takes no value")
        try:
            setattr(namespace, self.dest, _parse_scalar(bool, values, option_string or self.dest))
        except ConfigError as exc:
            parser.error(str(exc))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_arguments(parser: argparse.ArgumentParser, cls: type, include: Any = None,
                  helps: dict[str, str] | None = None) -> None:
    """One flag per field (``--field-name``; a bool field ``--x`` / ``--no-x``), plus ``--config FILE``.

    ``include(field)`` picks the fields that get a flag (default: all); the others keep their defaults and
    may still be set in the ``--config`` file. A field's help is its ``metadata["help"]``, else ``helps[name]``.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or (include is not None and not include(f)):
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        doc = (f.metadata or {}).get("help") or (helps or {}).get(f.name, "")
        if tp is bool:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, action=BoolFlag,
                                help=f"{doc} (default: {'on' if default else 'off'})".strip())
            continue
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        # Flags stay strings here; coerce() converts them with the field's type so
        # YAML and flags share one set of rules and one set of error messages.
        parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{doc} (default: {shown})".strip())


def read_yaml_mapping(path: str | Path, label: str, what: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors start with ``label`` and say what was expected."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML ({exc})") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{label}: expected {what}")
    return loaded


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        data.update(read_yaml_mapping(args.config, f"--config {args.config}", "a mapping of settings"))
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return from_dict(cls, data, where=cls.__name__)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
