"""One line for every way a program can fail that is the user's to fix.

A bad flag, config field, preset or value, a user error (errors.UserError) or an OS error
(missing file, full disk) anywhere in the run, and Ctrl-C each end in exactly one
``error: ...`` line (exit code 2; 130 for Ctrl-C) instead of a traceback. Errors from
computation that are not the user's keep their traceback: they are bugs.
"""
import difflib
import errno
import re
import sys

from absl import flags

from disentangle_jax import errors

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C (128 + SIGINT)


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
  """Prints ``error: message`` as one line and exits."""
  print("error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(code)


def flag_error(e: Exception, argv) -> str:
  """One readable sentence for a flag-parsing failure."""
  if isinstance(e, (KeyError, AttributeError)):  # an unknown --config.<field>
    # ml_collections wraps KeyError("'field'\nDid you mean \"x\" instead of ...?") in an
    # AttributeError (nested fields) or raises it as is (top-level sections).
    inner = e.args[0] if e.args else "?"
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    key = str(text).split("\n")[0].strip("'\"")
    names = [a.split("=")[0].lstrip("-") for a in argv[1:] if a.startswith(("--config.",
                                                                            "-config."))]
    given = [n for n in names if key in n.split(".")[1:]]
    hint = re.search(r'Did you mean "([^"]+)"', str(text))
    return (f"--{given[0] if given else 'config.' + key}: no such field; "
            + (f"did you mean {hint.group(1)!r}?" if hint else
               "--show_config lists every field."))
  cause, own = e, None
  while cause is not None:  # the config file's own error (e.g. an unknown preset), if any:
    if isinstance(cause, errors.UserError):  # the innermost one (ml_collections re-raises it
      own = cause  # with its traceback as the message)
    cause = cause.__cause__ or cause.__context__
  if own is not None:
    return str(own)
  text = str(e)
  if isinstance(e, flags.UnrecognizedFlagError):
    name = getattr(e, "flagname", "")
    close = difflib.get_close_matches(name, list(flags.FLAGS), n=1)
    text = f"unknown flag --{name}" + (f"; did you mean --{close[0]}?" if close else
                                       "; --helpshort lists the flags.")
  elif "Error while parsing string" in text and "as tuple" in text:
    text = text.split(": Error while parsing")[0] + ": not a list; write a comma list without " \
        "spaces, e.g. 1,2,3, or quote it."
  return text


def guarded(main):
  """``main`` with Ctrl-C, user errors and OS errors turned into one ``error:`` line each."""
  def wrapped(argv):
    try:
      return main(argv)
    except KeyboardInterrupt:
      fail("interrupted (Ctrl-C); nothing unfinished was published. Run the same command "
           "again to resume from the last checkpoint.", EXIT_INTERRUPTED)
    except errors.UserError as e:
      fail(str(e))
    except OSError as e:
      fail(os_error(e))
  return wrapped


def os_error(e: OSError) -> str:
  """One sentence with the fix for an OS error (full disk, no permission, missing file)."""
  where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
  if e.errno == errno.ENOSPC:
    return (f"the disk is full (writing{where}): free space and run the same command again; "
            "finished work (checkpoints, study chunks) is kept.")
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"permission denied{where}: choose a --workdir and files you can read and write."
  return f"{e.strerror or e}{where}."
