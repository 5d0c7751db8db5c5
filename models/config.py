"""params.yaml, its sections as config dataclasses, and whole-number command-line options."""
import argparse
import dataclasses

from models.errors import ParamsError, read_parsed


def load_params(path="params.yaml"):
    """The sections of a params file; ParamsError naming the file if it cannot be read."""
    params = read_parsed(path, "YAML", "no such file (run from the repository root)", ParamsError)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    return params


def from_section(cls, section, source):
    """cls(**section) for a params.yaml section (None: all defaults). Every error is a ParamsError
    naming `source`: a section that is not a mapping, a key that is not a field of `cls` (a typo,
    a removed option), a required field left out, a value the class's own checks refuse."""
    if section is not None and not isinstance(section, dict):
        raise ParamsError(f"{source}: expected a mapping of parameters, got "
                          f"{type(section).__name__} {section!r}")
    section = dict(section or {})
    fields = dataclasses.fields(cls)
    known = {f.name for f in fields}
    unknown = set(section) - known
    if unknown:
        raise ParamsError(f"{source}: unknown parameter(s) {sorted(unknown)}; "
                          f"known: {sorted(known)}")
    required = [f.name for f in fields if f.name not in section and f.init
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise ParamsError(f"{source}: missing parameter(s) {required}")
    for f in fields:
        if f.name in section:
            section[f.name] = _number(section[f.name], f.type, f"{source}.{f.name}")
    try:
        return cls(**section)
    except ValueError as e:   # __post_init__'s checks do not know where the values came from
        raise ParamsError(f"{source}: {e}") from None


def _number(value, kind, name):
    """A str for an int/float field (PyYAML reads `1e-3`, without a dot, as a string) as a number;
    a value that is no number is an error naming the key."""
    kind = {"int": int, "float": float}.get(kind, kind)
    if kind not in (int, float) or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ParamsError(f"{name}={value!r}: expected a number") from None
    if not isinstance(value, (int, float)):
        raise ParamsError(f"{name}={value!r}: expected a number")
    if kind is int:
        if value != int(value):
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
