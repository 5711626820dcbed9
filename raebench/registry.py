"""A small, typed name -> spec registry with aliases and close-name suggestions.

One registry per kind (tokenizers, metrics, datasets). Entries are frozen dataclass specs whose
metadata needs no weights; anything expensive lives behind the spec's lazy ``build``.
"""

from __future__ import annotations

import difflib
import re
from typing import Generic, Iterator, TypeVar

from raebench.errors import UnknownNameError

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*$")


class Registry(Generic[T]):
    """Maps lowercase kebab-case names (and aliases) to specs of one kind."""

    def __init__(self, kind: str, listed: bool = True) -> None:
        """``listed``: ``raebench ls <kind>s`` lists this registry (else an unknown name's error lists the names)."""
        self.kind = kind
        self.listed = listed
        self._specs: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, spec: T, aliases: tuple[str, ...] = ()) -> T:
        for n in (name, *aliases):
            if not _NAME_RE.match(n):
                raise ValueError(f"{self.kind} name {n!r} must be lowercase kebab-case")
            if n in self._specs or n in self._aliases:
                raise ValueError(f"{self.kind} {n!r} is already registered")
        self._specs[name] = spec
        for a in aliases:
            self._aliases[a] = name
        return spec

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        if key in self._specs:
            return key
        if key in self._aliases:
            return self._aliases[key]
        candidates = list(self._specs) + list(self._aliases)
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
        if not close:  # substring matches catch 'dinov2' -> 'rae-dinov2-b'
            close = [c for c in candidates if key and (key in c or c in key)][:3]
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = f"Run `raebench ls {self.kind}s` to list them." if self.listed else f"Known: {', '.join(sorted(self._specs))}."
        raise UnknownNameError(f"Unknown {self.kind} {name!r}.{hint} {known}")

    def get(self, name: str) -> T:
        return self._specs[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._specs)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, n in self._aliases.items() if n == name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._specs or name in self._aliases)

    def __iter__(self) -> Iterator[T]:
        return iter(self._specs[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._specs)
