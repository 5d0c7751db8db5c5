"""params.yaml, and the one way from a section of it to a validated config dataclass.

`from_section(cls, section, source)` is how every stage, the hw3 scripts and the release read
their settings: every key must be a field of `cls` and every value of the field's type, else a
ParamsError names the key and what is wrong. (Python 3.8: this module is on the hand-in's path.)
"""
import argparse
import dataclasses
import math
import typing

from common.errors import InputError, ParamsError, read_parsed


def load_params(path="params.yaml"):
    """The sections of a params file; ParamsError naming the file if it cannot be read."""
    params = read_parsed(path, "YAML", "no such file (run from the repository root)", ParamsError)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    return params


def from_section(cls, section, source, exclude=()):
    """cls(**section) for a params section (None: all defaults). Every error is a ParamsError
    naming `source`: a section that is not a mapping, a key that is not a field of `cls` (a typo,
    a removed option) or is in `exclude` (set elsewhere), a required field left out, a value
    of the wrong type (a field that is itself a dataclass is read the same way), a value the
    class's own checks refuse."""
    if section is not None and not isinstance(section, dict):
        raise ParamsError(f"{source}: expected a mapping of parameters, got "
                          f"{type(section).__name__} {section!r}")
    section = dict(section or {})
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    known = {f.name for f in fields}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(section) - known)
    if unknown:
        inner = {f.name: _dataclass_of(hints[f.name]) for f in fields}
        moved = [f"{name}.{k}" for k in unknown for name, kind in inner.items()
                 if kind and k in {g.name for g in dataclasses.fields(kind)}]
        hint = f" (did you mean {', '.join(moved)}?)" if moved else ""
        raise ParamsError(f"{source}: unknown parameter(s) {unknown}{hint}; known: {sorted(known)}")
    required = [f.name for f in fields if f.name not in section
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ParamsError(f"{source}: missing parameter(s) {required}")
    for name in section:
        section[name] = checked(section[name], hints[name], f"{source}.{name}")
    try:
        return cls(**section)
    except ParamsError:
        raise
    except (ValueError, InputError) as e:   # __post_init__'s checks do not know the source
        raise ParamsError(f"{source}: {e}") from None


def _dataclass_of(kind):
    """The dataclass a field of type `kind` holds (Optional[...] unwrapped), else None."""
    options = typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
    found = [k for k in options if dataclasses.is_dataclass(k)]
    return found[0] if found else None


def checked(value, kind, name):
    """`value` as a field of type `kind` takes it: a str for an int/float (PyYAML reads `1e-3`,
    without a dot, as a string) becomes the number; anything that does not fit is a ParamsError
    naming `name`. Types it does not know (object, Any) take any value."""
    if kind is typing.Any or kind is object:
        return value
    if typing.get_origin(kind) is typing.Union:
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        rest = [k for k in options if k is not type(None)]
        return checked(value, rest[0], name) if len(rest) == 1 else value
    if dataclasses.is_dataclass(kind):
        return value if isinstance(value, kind) else from_section(kind, value, name)
    if kind is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{name}={value!r}: expected true or false")
        return value
    if kind in (int, float):
        return _number(value, kind, name)
    plain = typing.get_origin(kind) or kind
    if plain in (list, tuple) and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(plain, type) and not isinstance(value, plain):
        expected = {list: "a list", tuple: "a list", dict: "a mapping", str: "a string"}.get(
            plain, plain.__name__)
        raise ParamsError(f"{name}={value!r}: expected {expected}")
    return value


def _number(value, kind, name):
    if isinstance(value, bool):
        raise ParamsError(f"{name}={value!r}: expected a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ParamsError(f"{name}={value!r}: expected a number") from None
    if not isinstance(value, (int, float)):
        raise ParamsError(f"{name}={value!r}: expected a number")
    if kind is int:
        if not math.isfinite(value) or value != int(value):
            raise ParamsError(f"{name}={value!r}: expected a whole number")
        return int(value)
    return float(value)


def int_at_least(least):
    """An argparse `type`: a whole number >= `least`; anything else is a usage error naming the
    option (rather than, say, a batch size of 0 quietly meaning "the default")."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below the least allowed, {least}")
        return value
    return parse
