"""Pieces every entry point shares: user-error reporting and config -> library objects."""
import contextlib
import sys


@contextlib.contextmanager
def user_errors():
  """Turns a ValueError/OSError raised while validating input into one line and exit code 2.

  Wrap only the validation and loading phase: errors from computation are bugs and keep their
  traceback.
  """
  try:
    yield
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def as_tuple(value):
  """A config value given as one number, a tuple or a comma string -> tuple of ints."""
  if isinstance(value, str):
    try:
      return tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
      raise ValueError(f"{value!r} is not a list of integers: write e.g. 42,43.") from None
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return (value,)


def load_model(model_cfg):
  from disentangle_jax import models  # noqa: PLC0415
  return models.load(models.ModelConfig(**model_cfg.to_dict()))


def encode_pair(model, prompt: str, target: str):
  from disentangle_jax import models, pipeline  # noqa: PLC0415
  c0, c1, uncond = models.encode_prompts(model, [prompt, target, ""])
  return pipeline.PromptPair(c0=c0, c1=c1, uncond=uncond)
