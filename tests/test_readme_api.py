"""The README's library section runs as written (on the tiny random model), and the research API
(disentangle_jax/api.py) gives what it says: the programs' images, the objective's gradient,
the weights files the programs read."""
import os
import re

import jax
import numpy as np
import pytest

from tests.conftest import ROOT

SECTION = "## The library"


def readme_snippets() -> list[str]:
  """The ```python blocks of the README's library section, in order."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  start = text.index(SECTION)
  end = text.find("\n## ", start + len(SECTION))
  return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
  """The namespace after running every snippet in one namespace, from a scratch folder."""
  snippets = readme_snippets()
  assert len(snippets) >= 5, "the library section lost its snippets"
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("readme"))
  try:
    namespace = {"__name__": "readme"}
    for i, code in enumerate(snippets):
      exec(compile(code, f"README.md library snippet {i + 1}", "exec"), namespace)  # pylint: disable=exec-used
    yield namespace
  finally:
    os.chdir(cwd)


def test_the_snippets_render_the_shapes_they_state(ran):
  assert ran["images"].shape == (2, 64, 64, 3)  # the last render (from the weights file)
  assert ran["pixels"].shape == (1, 64, 64, 3)
  assert np.all(np.isfinite(ran["images"])) and ran["images"].min() >= 0
  assert ran["images"].max() <= 1


def test_the_objective_is_differentiable_and_combines_with_own_terms(ran):
  grad, value = np.asarray(ran["grad"]), float(ran["value"])
  assert grad.shape == (10,) and np.all(np.isfinite(grad)) and np.any(grad != 0)
  assert np.isfinite(value) and value > 0.1 * float(np.sum(np.diff(ran["lam"]) ** 2))


def test_render_equals_the_library_pipeline(ran):
  """api.render draws and encodes as the programs do: the pipeline on the first snippet's
  embeddings and noise.draw of the same seeds gives the same images."""
  from disentangle_jax import api, mixing, noise, pipeline  # pylint: disable=import-outside-toplevel
  model, lam, sampling = ran["model"], ran["lam"], ran["sampling"]
  tables = sampling.tables(model.schedule)
  run = noise.draw(jax.random.key(0), [42, 7], (8, 8, 4), tables.sigma)
  prompts = pipeline.PromptPair(ran["c0"], ran["c1"], ran["uncond"])
  params = {"unet": model.params["unet"], "vae": model.params["vae"]}
  direct = api._render_fn(model, sampling.sampler_config("full"))(  # pylint: disable=protected-access
      params, run.x_T, run.noise, lam, prompts, 7.5, tables)
  np.testing.assert_array_equal(api.render(model, *ran["pair"], lam, [42, 7], sampling), direct)
  # Equal per-token weights are the per-step mix.
  np.testing.assert_array_equal(ran["cond"], mixing.mix(lam, ran["c0"], ran["c1"]))
  assert isinstance(ran["w"].lam, np.ndarray) and not isinstance(ran["w"].lam, mixing.PerToken)


def test_weights_files_round_trip_both_shapes(ran, tmp_path):
  from disentangle_jax import api, mixing, weights_file  # pylint: disable=import-outside-toplevel
  w = ran["w"]
  np.testing.assert_array_equal(w.lam, ran["lam"])
  assert (w.prompt, w.target_prompt, w.sampling) == (*ran["pair"], ran["sampling"])
  path = str(tmp_path / "tokens.json")
  api.save_weights(path, ran["per_token"], *ran["pair"], ran["model"], ran["sampling"], note="x")
  back = api.load_weights(path)
  assert isinstance(back.lam, mixing.PerToken) and back.lam.lam.shape == (10, 77)
  assert weights_file.read(path).extra == {"note": "x", "rng_seed": 0}
  with pytest.raises(ValueError, match=r"shape \(9,\)"):
    api.save_weights(path, ran["lam"][:9], *ran["pair"], ran["model"], ran["sampling"])
