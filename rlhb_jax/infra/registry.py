"""Named implementations of one config option (reward sources, advantage estimators): the one
place a config string is looked up, so that nothing else branches on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """`register(name, **fields)` decorates a function into an entry `entry(fn, **fields)`;
  `get(name)` returns it, or raises a ValueError naming the config option and the known names."""

  def __init__(self, option: str, entry: Callable[..., T]):
    self.option, self.entry = option, entry
    self.entries: dict[str, T] = {}

  def register(self, name: str, **fields) -> Callable:
    def add(fn: Callable) -> Callable:
      self.entries[name] = self.entry(fn, **fields)
      return fn

    return add

  def get(self, name: str) -> T:
    if name not in self.entries:
      raise ValueError(f"{self.option}={name!r}: expected one of {tuple(self.entries)}")
    return self.entries[name]

  def __iter__(self):
    return iter(self.entries)

  def __contains__(self, name: object) -> bool:
    return name in self.entries
