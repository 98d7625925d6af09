"""A warm start for the command-line tests: imports the libraries once, then forks a fresh
process per program run (``python tests/program_server.py SOCKET``; conftest.Cli drives it).

Each run costs a fork instead of ~5-10 s of imports (jax, flax, diffusers, transformers,
torch, orbax). The child is a new process: its own pid, signals, stdout/stderr pipes,
working directory and environment; it runs ``launch.<module>`` exactly as ``python -m`` does
(``runpy._run_module_as_main``) and leaves through the interpreter's normal exit (threads
joined, atexit handlers run). JAX's backend is never started here, so every child starts its
own. What a child shares with its siblings: the modules imported below (their import-time
output goes to this server's stderr) and the string hash seed.

Protocol (one Unix-socket connection per run): the client sends one JSON line
{"module", "argv", "cwd", "env"} (or "code" instead of "module": ``python -c``) with its stdin/stdout/stderr fds attached (SCM_RIGHTS); the
server answers ``pid\\n`` at once and the wait status ``status\\n`` when the child exits.
"""
import json
import os
import select
import socket
import sys

# Imported once here; never anything that starts a JAX backend or defines the programs' flags.
PRELOAD = ("numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "PIL.Image",
           "ml_collections.config_flags", "absl.app", "absl.flags", "absl.logging",
           "matplotlib", "matplotlib.pyplot", "diffusers", "transformers",
           "disentangle_jax.disentangle", "disentangle_jax.study", "disentangle_jax.study_store",
           "disentangle_jax.inversion", "disentangle_jax.switch_grid", "disentangle_jax.plots",
           "disentangle_jax.checkpoint", "disentangle_jax.real_images", "disentangle_jax.images",
           "disentangle_jax.metrics", "disentangle_jax.stats", "disentangle_jax.workdir",
           "disentangle_jax.run_identity", "disentangle_jax.weights_file")


def _preload():
  import importlib  # pylint: disable=import-outside-toplevel
  for name in PRELOAD:
    try:
      importlib.import_module(name)
    except ImportError:
      pass  # optional (matplotlib): the child reports it as the program would
  # The tiny model's weight shapes, traced once here instead of in every program (~0.7 s each;
  # abstract, so no backend starts).
  from disentangle_jax import models  # pylint: disable=import-outside-toplevel
  for module in models.tiny.tiny_unet_and_vae(models.ModelConfig())[:2]:
    models.build.init_shapes(module)
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  assert not xla_bridge._backends, "a preloaded module started a JAX backend"  # pylint: disable=protected-access
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import compile_report  # pylint: disable=import-outside-toplevel
  sys.path.pop(0)
  compile_report.install()  # opt-in; the forked programs inherit it
  import gc  # pylint: disable=import-outside-toplevel
  gc.collect()
  gc.freeze()  # the children's garbage collections skip (and so do not copy) these objects


def _serve(path):
  """Accepts runs until the client closes the server; returns (in the child only) the run."""
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(64)
  print("ready", flush=True)
  waiting = {}  # pid -> connection
  while True:
    readable, _, _ = select.select([listener], [], [], 0.02)
    if readable:
      conn, _ = listener.accept()
      data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
      run = json.loads(data.decode())
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:  # the child: drop the server's sockets, take the run's stdio
        listener.close()
        for other in waiting.values():
          other.close()
        conn.close()
        for target, fd in enumerate(fds):
          os.dup2(fd, target)
          os.close(fd)
        return run
      for fd in fds:
        os.close(fd)
      conn.sendall(f"{pid}\n".encode())
      waiting[pid] = conn
    while waiting:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      conn = waiting.pop(pid, None)
      if conn is not None:
        try:
          conn.sendall(f"{status}\n".encode())
        except OSError:
          pass  # the test went away
        conn.close()


def main():
  path = sys.argv[1]
  sys.path[0] = os.getcwd()  # as `python -m` from the repository root
  _preload()
  run = _serve(path)
  os.chdir(run["cwd"])
  os.environ.clear()
  os.environ.update(run["env"])
  if "code" in run:  # as `python -c CODE *argv`
    sys.argv = ["-c", *run["argv"]]
    exec(compile(run["code"], "<string>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
  else:
    sys.argv = [run["module"], *run["argv"]]
    import runpy  # pylint: disable=import-outside-toplevel
    runpy._run_module_as_main(run["module"])  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
