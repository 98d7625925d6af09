"""Silences diffusers' and transformers' Flax deprecation notices inside this library's calls.

diffusers 0.39 logs "Flax classes are deprecated ..." from every Flax module each time it is
traced (about 140 lines per sampling program) and transformers 4.57 logs a similar notice.
``quiet`` drops exactly those records while one of our calls runs; outside our calls, and for
every other message, the libraries log as they always do.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Iterator, TypeVar

_NOTICES = ("classes are deprecated and will be removed",)
_LIBRARIES = ("diffusers", "transformers")
F = TypeVar("F", bound=Callable)


class _DropNotices(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not any(n in record.getMessage() for n in _NOTICES)


_FILTER = _DropNotices()
_depth = 0


def _targets() -> list:
  """The libraries' loggers, plus every handler a record of theirs can reach (their own and
  the root logger's): modules the libraries import lazily get loggers only while we run."""
  loggers = [logging.getLogger(n) for n in list(logging.Logger.manager.loggerDict)
             if n.split(".")[0] in _LIBRARIES]
  handlers = [h for name in _LIBRARIES + ("",) for h in logging.getLogger(name).handlers]
  return loggers + handlers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
  """Within the block, the libraries' deprecation notices are dropped (re-entrant)."""
  global _depth
  if _depth == 0:
    for target in _targets():
      target.addFilter(_FILTER)
  _depth += 1
  try:
    yield
  finally:
    _depth -= 1
    if _depth == 0:
      for target in _targets():
        target.removeFilter(_FILTER)


def quietly(fn: F) -> F:
  """Decorator: ``fn`` runs inside ``quiet()``."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with quiet():
      return fn(*args, **kwargs)
  return wrapped  # type: ignore[return-value]
