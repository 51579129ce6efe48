"""Frozen records for the modules on cshare-overlay's start path.

`@dataclass(frozen=True)` would do, but importing dataclasses pulls in inspect
and ast (~10 ms here), and the command line must be parsed before anything is
mounted: every mount would wait for it.  `record` gives a class what these
modules used of a frozen dataclass:

- fields and defaults come from the class's annotations;
- construction is positional or by keyword;
- equality, hashing and the repr go over the fields;
- no assignment is allowed afterwards.

Type checkers see a frozen dataclass (`dataclass_transform`).  Defaults must
be immutable values (no field factories).  Names listed in a class attribute
`__uncompared__` are left out of equality and hashing.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_kwargs):  # at run time only the decorated function matters
        return lambda func: func

_MISSING = object()


@dataclass_transform(frozen_default=True)
def record(cls: type[T]) -> type[T]:
    """Make `cls` a frozen record of its annotated fields."""
    fields = tuple(
        (name, cls.__dict__.get(name, _MISSING))
        for name, annotation in cls.__dict__.get("__annotations__", {}).items()
        if not str(annotation).startswith("ClassVar")
    )
    names = tuple(name for name, _ in fields)
    uncompared: frozenset[str] = getattr(cls, "__uncompared__", frozenset())
    compared = tuple(name for name in names if name not in uncompared)
    title = cls.__name__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{title}() takes {len(names)} arguments, {len(args)} given")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{title}() has no field {key!r}")
            if key in values:
                raise TypeError(f"{title}() got two values for {key!r}")
            values[key] = value
        for name, default in fields:
            if name not in values:
                if default is _MISSING:
                    raise TypeError(f"{title}() needs a value for {name!r}")
                values[name] = default
        self.__dict__.update(values)  # past __setattr__, which refuses

    def __setattr__(self: Any, name: str, value: Any) -> None:
        raise AttributeError(f"{title} is frozen: cannot assign to {name!r}")

    def __delattr__(self: Any, name: str) -> None:
        raise AttributeError(f"{title} is frozen: cannot delete {name!r}")

    def _key(self: Any) -> tuple[Any, ...]:
        return tuple(self.__dict__[name] for name in compared)

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(_key(self) == _key(other))

    def __hash__(self: Any) -> int:
        return hash(_key(self))

    def __repr__(self: Any) -> str:
        inside = ", ".join(f"{name}={self.__dict__[name]!r}" for name in names)
        return f"{title}({inside})"

    for method in (__init__, __setattr__, __delattr__, __eq__, __hash__, __repr__):
        method.__qualname__ = f"{title}.{method.__name__}"
        setattr(cls, method.__name__, method)
    setattr(cls, "__match_args__", names)  # noqa: B010  (a class attribute mypy would refuse)
    return cls
