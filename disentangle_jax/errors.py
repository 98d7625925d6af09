"""Errors a user can cause, and the checks that raise them.

Every program turns a ``UserError`` into one ``error: ...`` line and exit code 2 (see
launch/common.py). Code that must tell cases apart catches a specific subclass, never matches
message text. ``UserError`` derives from ValueError, so library callers that already catch
ValueError keep working.
"""
from __future__ import annotations

import math
import numbers


class UserError(ValueError):
  """Bad input, a bad setting or a bad file: the message names the input and the fix."""


class RunMismatch(UserError):
  """A workdir's saved state (checkpoints, study rows) belongs to a run with other settings."""


class WorkdirBusy(UserError):
  """Another live process holds the workdir's lock."""


class NonFinite(UserError):
  """An optimisation step produced a non-finite loss, gradient or lambda."""


class NotAWeightsFile(UserError):
  """A JSON file that is not an exported weights file (it may still be a plain lambda list)."""


class CheckpointUnreadable(UserError):
  """No checkpoint of a workdir can be read."""


class CheckpointWriteFailed(UserError):
  """A checkpoint could not be written for a reason other than a full disk or a permission."""


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, integer: bool = False, hint: str = "") -> float:
  """``value`` as a finite number in [low, high] (or (low, high] with ``low_open``).

  Raises UserError naming the setting, the accepted range and ``hint``. Booleans are refused
  (True is an int in Python, never a meaningful step count or weight).
  """
  kind = "an integer" if integer else "a number"
  ok_type = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, ok_type):
    raise UserError(f"{name}={value!r} must be {kind}{_range(low, high, low_open)}.{_h(hint)}")
  if not math.isfinite(float(value)):
    raise UserError(f"{name}={value!r} must be finite{_range(low, high, low_open)}.{_h(hint)}")
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and value > high
  if too_low or too_high:
    raise UserError(f"{name}={value!r} is out of range: it must be{_range(low, high, low_open)}."
                    f"{_h(hint)}")
  return value


def _range(low, high, low_open) -> str:
  if low is None and high is None:
    return ""
  if high is None:
    return f" {'>' if low_open else '>='} {low:g}"
  if low is None:
    return f" <= {high:g}"
  return f" in {'(' if low_open else '['}{low:g}, {high:g}]"


def _h(hint: str) -> str:
  return f" {hint}" if hint else ""
