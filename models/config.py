"""Config dataclasses from params.yaml sections."""
import dataclasses


def from_section(cls, section, source):
    """cls(**section) for a params.yaml section (None: all defaults). A key that is not a field of
    `cls` (a typo, a removed option) is an error naming `source`, the key and the known ones."""
    section = dict(section or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(section) - known
    if unknown:
        raise ValueError(f"{source}: unknown parameter(s) {sorted(unknown)}; known: {sorted(known)}")
    for f in dataclasses.fields(cls):
        if f.name in section:
            section[f.name] = _number(section[f.name], f.type, f"{source}.{f.name}")
    return cls(**section)


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
            raise ValueError(f"{name}={value!r}: expected a number") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a number")
    if kind is int:
        if value != int(value):
            raise ValueError(f"{name}={value!r}: expected a whole number")
        return int(value)
    return float(value)
