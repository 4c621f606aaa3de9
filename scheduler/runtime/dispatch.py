"""Which instance of a role takes a request: the least loaded one (ties: the first)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def least_loaded(instances: Sequence[T], load: Callable[[T], float]) -> T:
    if not instances:
        raise ValueError("no instance to dispatch to")
    return min(instances, key=load)
