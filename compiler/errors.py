"""Errors raised while reading definitions.

Every error names the file, the path inside the document (``rule.all[2].within``) and the
reason, so a user can find and fix the offending line without reading compiler code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class DefinitionError(Exception):
    """An invalid segment, score or destination definition."""

    def __init__(self, file: str | None, path: str, reason: str) -> None:
        self.file = file
        self.path = path
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [self.file or "<input>"]
        # Whole-document errors (not a mapping, YAML syntax) have no path to show.
        if self.path:
            parts.append(self.path)
        parts.append(self.reason)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._message()

    def with_file(self, file: str | None) -> DefinitionError:
        """The same error attributed to ``file`` (kept if already set)."""
        if self.file is not None or file is None:
            return self
        return type(self)(file, self.path, self.reason)


class CycleError(DefinitionError):
    """Segments that refer to each other through ``in_segment``.

    ``cycle`` lists the names along the cycle with the first repeated at the end,
    e.g. ``("a", "b", "a")``: ``a`` refers to ``b`` which refers back to ``a``.
    """

    def __init__(self, file: str | None, path: str, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        super().__init__(file, path, "in_segment cycle: " + " -> ".join(self.cycle))

    def with_file(self, file: str | None) -> CycleError:
        if self.file is not None or file is None:
            return self
        return CycleError(file, self.path, self.cycle)


class DefinitionErrors(DefinitionError):
    """Several errors found in one load, reported together.

    It is a ``DefinitionError`` itself (file, path and reason of the first error) so a
    caller that catches ``DefinitionError`` sees every problem in ``str(error)``.
    """

    def __init__(self, errors: Sequence[DefinitionError]) -> None:
        if not errors:
            raise ValueError("DefinitionErrors needs at least one error")
        flat: list[DefinitionError] = []
        for error in errors:
            # Nested aggregates are flattened so every line names one problem.
            flat.extend(error.errors if isinstance(error, DefinitionErrors) else [error])
        self.errors: tuple[DefinitionError, ...] = tuple(flat)
        first = self.errors[0]
        super().__init__(first.file, first.path, first.reason)

    def _message(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        lines = [f"{len(self.errors)} errors in definitions:"]
        lines.extend(f"  {error}" for error in self.errors)
        return "\n".join(lines)

    def with_file(self, file: str | None) -> DefinitionErrors:
        return DefinitionErrors([error.with_file(file) for error in self.errors])

    def __iter__(self) -> Iterator[DefinitionError]:
        return iter(self.errors)

    def __len__(self) -> int:
        return len(self.errors)


def raise_collected(errors: Sequence[DefinitionError]) -> None:
    """Raise nothing, the single error, or all of them together."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise DefinitionErrors(errors)
