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
    return cls(**section)
