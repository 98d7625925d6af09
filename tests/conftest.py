"""Shared fixtures: the tiny model and a tiny PyTorch checkpoint folder in diffusers layout."""
import os

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The tests and the programs they start (conftest.cli) compile XLA:CPU code without LLVM
# optimisation: about twice as fast to compile, and the tiny programs run just as well (the
# suite is mostly compilation). XLA_FLAGS=--xla_backend_optimization_level=N in the
# environment overrides it.
XLA_TEST_FLAGS = next((f for f in os.environ.get("XLA_FLAGS", "").split()
                       if f.startswith("--xla_backend_optimization_level")),
                      "--xla_backend_optimization_level=0")


# The compilation cache is shared by the programs the tests of a run start (conftest.Cli, from
# both pytest-xdist workers), which write and read it side by side. JAX locks the cache folder
# (a file lock around each read and write) only when it has a size limit, so it gets one, far
# above what a run writes (~0.1 GiB). Read by JAX from the environment in every process.
CACHE_LIMIT = {"JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)}


def program_env(env=None) -> dict:
  """``env`` (default: this process's) with XLA_TEST_FLAGS in XLA_FLAGS and the cache limit."""
  env = dict(os.environ if env is None else env)
  flags = env.get("XLA_FLAGS", "")
  if "--xla_backend_optimization_level" not in flags:
    env["XLA_FLAGS"] = f"{flags} {XLA_TEST_FLAGS}".strip()
  return {**env, **CACHE_LIMIT}


os.environ.update(program_env())  # this process too (read when jax is imported / starts)

from tests import compile_report  # pylint: disable=g-import-not-at-top,wrong-import-position

compile_report.install()  # opt-in (DISENTANGLE_COMPILE_REPORT=DIR): JAX compile time per program

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import hashlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# The SD v1 scheduler_config.json (PNDMScheduler), as shipped with the checkpoints.
SD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


@pytest.fixture(scope="session")
def tiny_model():
  """The tiny built-in model (float32, seed 0)."""
  from disentangle_jax import models  # pylint: disable=g-import-not-at-top
  return models.build_tiny(models.ModelConfig())


@pytest.fixture(scope="session")
def torch_sd_dir(tmp_path_factory):
  """A tiny PyTorch Stable Diffusion saved as safetensors in diffusers layout.

  Same configs as ``models.build_tiny``, weights from ``torch.manual_seed(0)``.

  Returns:
    (path, {"unet": UNet2DConditionModel, "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}), torch modules in eval
    mode, float32.
  """
  torch = pytest.importorskip("torch", reason="needs torch: pip install torch==2.13.0")
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from disentangle_jax import models  # pylint: disable=g-import-not-at-top

  path = tmp_path_factory.mktemp("torch_sd")
  models.write_tiny_tokenizer(path / "tokenizer")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
  torch.manual_seed(0)
  modules = {
      "unet": diffusers.UNet2DConditionModel(**models.tiny_unet_config()),
      "vae": diffusers.AutoencoderKL(**models.tiny_vae_config()),
      "text_encoder": transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**models.tiny_text_config(tokenizer))),
  }
  for name, module in modules.items():
    module.eval()
    module.save_pretrained(path / name, safe_serialization=True)
  (path / "scheduler").mkdir()
  (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_CONFIG))
  (path / "model_index.json").write_text(json.dumps({
      "_class_name": "StableDiffusionPipeline",
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "scheduler": ["diffusers", "PNDMScheduler"],
  }))
  return path, dict(modules, tokenizer=tokenizer)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Forked:
  """What the tests use of ``subprocess.Popen``, for a program forked by tests/program_server.py
  (pid, stdout/stderr pipes, poll/wait/send_signal/kill/communicate, returncode)."""

  def __init__(self, sock, args, stdout, stderr):
    self.args = args
    self._sock = sock
    self._reply = sock.makefile("r")
    self.pid = int(self._reply.readline())
    self.stdout, self.stderr = stdout, stderr
    self.returncode = None

  def poll(self):
    if self.returncode is None:
      import select  # pylint: disable=g-import-not-at-top
      if select.select([self._sock], [], [], 0)[0]:
        self._finish()
    return self.returncode

  def _finish(self):
    line = self._reply.readline()
    if not line:
      raise RuntimeError("tests/program_server.py went away")
    self.returncode = os.waitstatus_to_exitcode(int(line))
    self._reply.close()
    self._sock.close()

  def wait(self, timeout=None):
    import select  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    if self.returncode is None:
      if not select.select([self._sock], [], [], timeout)[0]:
        raise subprocess.TimeoutExpired(self.args, timeout)
      self._finish()
    return self.returncode

  def send_signal(self, sig):
    if self.returncode is None:
      os.kill(self.pid, sig)

  def kill(self):
    import signal  # pylint: disable=g-import-not-at-top
    self.send_signal(signal.SIGKILL)

  def communicate(self, timeout=None):
    import threading  # pylint: disable=g-import-not-at-top
    out = {}

    def read(name, stream):
      out[name] = stream.read() if stream else None
      if stream:
        stream.close()

    readers = [threading.Thread(target=read, args=(n, s), daemon=True)
               for n, s in (("stdout", self.stdout), ("stderr", self.stderr))]
    for r in readers:
      r.start()
    self.wait(timeout)
    for r in readers:
      r.join()
    return out["stdout"], out["stderr"]


@contextlib.contextmanager
def interruptible():
  """Around starting a program: it sees Ctrl-C, as a shell's children do. A child inherits a
  blocked or ignored SIGINT (signal mask and SIG_IGN survive exec); in a full ``-n 2`` run
  both pytest-xdist workers had SIGINT set to SIG_IGN by the time their program server
  started (measured), and the Ctrl-C test's program ignored every SIGINT. This process's own
  disposition is put back afterwards (xdist's controller handles Ctrl-C for its workers)."""
  import signal  # pylint: disable=g-import-not-at-top
  mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
  handler = signal.getsignal(signal.SIGINT)
  if handler in (signal.SIG_IGN, None):
    signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    if handler in (signal.SIG_IGN, None):
      signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def signal_state(pid) -> str:
  """SigBlk / SigIgn masks of a process (/proc), for messages."""
  try:
    with open(f"/proc/{pid}/status") as f:
      return " ".join(l.strip() for l in f if l.startswith(("SigBlk", "SigIgn")))
  except OSError:
    return "(gone)"


class ProgramServer:
  """tests/program_server.py, started once per session: forks each program run from a process
  that has already imported the libraries."""

  def __init__(self, folder):
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    self.path = os.path.join(folder, "server.sock")
    with interruptible():
      self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests",
                                                                 "program_server.py"), self.path],
                                   cwd=ROOT, stdout=subprocess.PIPE, text=True, env=program_env())
    if self.proc.stdout.readline().strip() != "ready":
      raise RuntimeError("tests/program_server.py did not start (see the output above)")

  def start(self, module, argv, cwd, env=None, stdout=True, code=None):
    """Forks ``python -m module *argv`` (``python -c code *argv`` when ``code`` is given);
    returns a Forked with pipes for stderr and (when ``stdout``) stdout (otherwise stdout is
    this process's)."""
    import json  # pylint: disable=g-import-not-at-top
    import socket  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    ends = [os.open(os.devnull, os.O_RDONLY)]
    readers = []
    for wanted in (stdout, True):
      if wanted:
        r, w = os.pipe()
        readers.append(os.fdopen(r, "r"))
        ends.append(w)
      else:
        readers.append(None)
        ends.append(os.dup(sys.stdout.fileno()))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(self.path)
    run = {"module": module, "argv": list(argv), "cwd": str(cwd),
           "env": program_env(env)}
    if code is not None:
      run["code"] = code
    socket.send_fds(sock, [json.dumps(run).encode()], ends)
    for fd in ends:
      os.close(fd)
    return Forked(sock, [module, *argv], readers[0], readers[1])

  def close(self):
    self.proc.terminate()
    self.proc.wait(timeout=60)


class Cli:
  """Runs the programs as a user does (``python -m launch.<module>`` from the repository root),
  all sharing one persistent compilation cache, so a program compiled once in a test run is not
  compiled again by later runs.

  Each run is a fresh process forked from tests/program_server.py, which has the libraries
  imported already (saves the ~5-10 s of imports per run); ``fresh=True`` starts a real
  ``python -m`` instead (its own imports and string hash seed: used where a test compares two
  runs that must not share anything)."""

  def __init__(self, cache: str, server: ProgramServer):
    self.cache = cache
    self.server = server

  def argv(self, module, workdir, *overrides) -> list[str]:
    return [f"--workdir={workdir}", f"--compilation_cache={self.cache}", *overrides]

  def cmd(self, module, workdir, *overrides) -> list[str]:
    import sys  # pylint: disable=g-import-not-at-top
    return [sys.executable, "-m", f"launch.{module}", *self.argv(module, workdir, *overrides)]

  def start(self, module, workdir, *overrides, env=None, stdout=True, fresh=False):
    """The running program (a Popen or a Forked), stderr (and stdout) piped."""
    import subprocess  # pylint: disable=g-import-not-at-top
    if fresh:
      with interruptible():
        return subprocess.Popen(self.cmd(module, workdir, *overrides), cwd=ROOT,
                                env=program_env(env),
                                stdout=subprocess.PIPE if stdout else None,
                                stderr=subprocess.PIPE, text=True)
    return self.server.start(f"launch.{module}", self.argv(module, workdir, *overrides), ROOT,
                             env=env, stdout=stdout)

  def run(self, module, workdir, *overrides, timeout=600, env=None, fresh=False):
    import subprocess  # pylint: disable=g-import-not-at-top
    proc = self.start(module, workdir, *overrides, env=env, fresh=fresh)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

  def run_code(self, code, *argv, env=None, timeout=900):
    """``python -c code *argv`` from the repository root (forked like the programs)."""
    import subprocess  # pylint: disable=g-import-not-at-top
    proc = self.server.start("-c", argv, ROOT, env=env, code=code)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

  def run_code_result(self, code, *argv, env=None, timeout=900):
    """Runs ``code`` like ``run_code``; it must exit 0 and print ``RESULT<json>`` last: the
    parsed JSON."""
    import json as json_lib  # pylint: disable=g-import-not-at-top
    proc = self.run_code(code, *argv, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json_lib.loads(proc.stdout.split("RESULT")[-1])

  def run_all(self, runs, timeout=600) -> list:
    """Runs ``[(module, workdir, overrides), ...]`` side by side (for runs refused before any
    JAX work); returns their CompletedProcess in order."""
    import subprocess  # pylint: disable=g-import-not-at-top
    procs = [self.start(module, workdir, *overrides) for module, workdir, overrides in runs]
    outs = []
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=timeout)
      outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return outs

  def kill_at(self, line: str, module, workdir, *overrides) -> int:
    """Starts a program, SIGKILLs it as soon as it logs a line containing ``line``; returns
    its exit status (-SIGKILL when killed)."""
    import signal  # pylint: disable=g-import-not-at-top
    proc = self.popen(module, workdir, *overrides)
    for text in proc.stderr:
      if line in text:
        proc.send_signal(signal.SIGKILL)
        break
    return proc.wait(timeout=600)

  def popen(self, module, workdir, *overrides, fresh=False):
    """The running program, stderr piped (stdout is the test's)."""
    return self.start(module, workdir, *overrides, stdout=False, fresh=fresh)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the programs the tests run (conftest.Cli): a program
  compiled again by a later run, a resumed one or one started side by side, is read back.
  Under pytest-xdist (``-n 2``) both workers' programs use the same folder, next to the
  workers' own temporary folders.

  The test processes themselves keep no persistent cache: no other process compiles their
  programs (measured: 3 of ~900 CPU-s saved by hits), and writing one costs its serialisation,
  0.3-0.5 s, and seconds more where a test bakes float64 weights into the program (zlib
  compresses 40 MB)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the run's folder, shared by the workers (each has a subfolder)
  path = os.path.join(root, "xla_cache")
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture(scope="session")
def cli(tmp_path_factory, compilation_cache):
  """The shared command-line runner (one compilation cache and one program server per test
  session)."""
  server = ProgramServer(str(tmp_path_factory.mktemp("program_server")))
  yield Cli(compilation_cache, server)
  server.close()


def error_lines(stderr: str) -> list[str]:
  """The ``error:`` lines a program printed."""
  return [line for line in stderr.splitlines() if line.startswith("error:")]


def refused(out, message):
  """Exit code 2, exactly one error line that contains ``message``, no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  lines = error_lines(out.stderr)
  assert len(lines) == 1 and message in lines[0], out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]


def snapshot(folder) -> dict[str, str]:
  """{relative path: sha256} of every file below ``folder`` except the lock (it records the
  pid of the last run that claimed the workdir)."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      if name == ".lock":
        continue
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


# The disentangle program the command-line tests share (tests/test_cli.py, tests/test_faults.py):
# one set of steps and shapes, compiled once per session.
DISENTANGLE = ("--config=configs/disentangle.py:snow", "--config.num_steps=4",
               "--config.t_star=2", "--config.optimizer.iterations=3")


def lines_until(stream, text, seen):
  """Reads ``stream`` (appending to ``seen``) until a line contains ``text``."""
  for line in stream:
    seen.append(line)
    if text in line:
      return
  raise AssertionError(f"{text!r} never logged:\n" + "".join(seen)[-3000:])


def write_weights(path, lam, num_steps=None, sampler="ddim"):
  """A weights file (as launch.disentangle exports it) with ``lam``; folders made."""
  from disentangle_jax import weights_file  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  weights_file.write(str(path), weights_file.LearnedWeights(
      lam=tuple(lam), prompt="p", target_prompt="p, q",
      num_steps=len(lam) if num_steps is None else num_steps, sampler=sampler, eta=0.0,
      guidance=7.5, schedule={}))
