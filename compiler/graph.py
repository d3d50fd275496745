"""The ``in_segment`` dependency graph: evaluation order and cycle detection."""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from compiler.errors import CycleError
from compiler.model import InSegmentCond, Segment


def direct_dependencies(segments: Mapping[str, Segment]) -> dict[str, set[str]]:
    """Segment name -> the segments its rule names with ``in_segment``.

    References to names outside ``segments`` are left out: checking that they exist is
    the loader's job, and the order of known segments does not depend on them.
    """
    return {
        name: {ref for ref in segment.referenced_segments() if ref in segments}
        for name, segment in segments.items()
    }


def dependency_order(segments: Mapping[str, Segment]) -> list[str]:
    """Every segment after the segments it refers to; ties broken by name.

    Raises ``CycleError`` naming one cycle if there is any.
    """
    waiting = direct_dependencies(segments)
    users: dict[str, set[str]] = {name: set() for name in segments}
    for name, deps in waiting.items():
        for dep in deps:
            users[dep].add(name)
    # Kahn's algorithm with a heap so the order is the same on every run.
    ready = [name for name, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        order.append(name)
        for user in users[name]:
            waiting[user].discard(name)
            if not waiting[user]:
                heapq.heappush(ready, user)
    if len(order) < len(segments):
        stuck = {name: deps for name, deps in waiting.items() if deps}
        raise _cycle_error(segments, _find_cycle(stuck))
    return order


def dependents(segments: Mapping[str, Segment]) -> dict[str, set[str]]:
    """Segment name -> every segment that depends on it, directly or transitively."""
    users: dict[str, set[str]] = {name: set() for name in segments}
    for name, deps in direct_dependencies(segments).items():
        for dep in deps:
            users[dep].add(name)
    result: dict[str, set[str]] = {}
    for name in segments:
        seen: set[str] = set()
        stack = list(users[name])
        while stack:
            user = stack.pop()
            if user not in seen:
                seen.add(user)
                stack.extend(users[user])
        result[name] = seen
    return result


def _find_cycle(stuck: Mapping[str, set[str]]) -> list[str]:
    """One cycle among segments left over by the topological sort.

    Every leftover segment still waits on another leftover one, so following the
    smallest dependency from the smallest name must come back to a segment already seen.
    """
    current = min(stuck)
    path: list[str] = []
    position: dict[str, int] = {}
    while current not in position:
        position[current] = len(path)
        path.append(current)
        current = min(stuck[current])
    cycle = path[position[current] :]
    start = cycle.index(min(cycle))
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]


def _cycle_error(segments: Mapping[str, Segment], cycle: list[str]) -> CycleError:
    first = segments[cycle[0]]
    path = "rule"
    for condition in first.conditions():
        if isinstance(condition, InSegmentCond) and condition.name == cycle[1]:
            path = f"{condition.loc}.in_segment" if condition.loc else "in_segment"
            break
    return CycleError(first.source_file, path, cycle)
