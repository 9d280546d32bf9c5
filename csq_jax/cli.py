"""What the command-line entry points share: ``--help`` that lists every flag
of the command (and the config fields) and exits 0, and one-line errors for
bad flags and bad ``--config.<field>=value`` overrides instead of absl's or
ml_collections' tracebacks."""

from __future__ import annotations

import difflib
import sys
import textwrap
from typing import Callable, Sequence

from absl import app, flags

HELP_ARGS = ("--help", "-h", "--helpshort", "--helpfull", "-?")


def config_overrides(argv: Sequence[str]) -> list[str]:
  return [a for a in argv[1:] if a.startswith("--config.")]


def _flag_value(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
  for a in argv[1:]:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default


def config_fields_help(spec: str | None) -> str:
  """The fields of the config ``spec`` (``PATH[:ARG]``; the common knobs
  without one), as ``--config.<field>`` overrides with their values."""
  from csq_jax import configlib

  try:
    path, _, arg = (spec or "").partition(":")
    config = configlib.load(path, arg) if path else configlib.common()
  except Exception as e:  # noqa: BLE001  (help still prints)
    return f"(config {spec!r} could not be loaded: {type(e).__name__}: {e})"
  items = [f"{k}={v!r}" for k, v in sorted(flat_fields(config.to_dict()).items())]
  where = spec or "csq_jax/configlib.py (common())"
  body = textwrap.fill(", ".join(items), width=100, initial_indent="    ", subsequent_indent="    ")
  return (f"  --config.<field>=value: override any field of the config; those of {where}"
          " (meaning: comments in csq_jax/configlib.py):\n" + body)


def flat_fields(d: dict, prefix: str = "") -> dict:
  """A nested config dict as ``{"a.b": value}`` (empty dicts kept as values)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(flat_fields(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def help_text(doc: str, modules: Sequence[str], config_spec: str | None) -> str:
  parts = [doc.strip(), "", "flags:"]
  for m in modules:
    text = flags.FLAGS.module_help(m)
    if text:
      parts.append(text.replace("__main__:", "", 1).strip("\n"))
  parts.append(config_fields_help(config_spec))
  return "\n".join(p for p in parts if p is not None) + "\n"


def unknown_override(argv: Sequence[str], config_spec: str | None) -> str | None:
  """A one-line description of the first ``--config.<field>`` override whose
  field the config lacks (None if all exist or the config cannot be loaded)."""
  from csq_jax import configlib

  path, _, arg = (config_spec or "").partition(":")
  try:
    config = configlib.load(path, arg)
  except Exception:  # noqa: BLE001
    return None
  fields = flat_fields(config.to_dict())
  for a in config_overrides(argv):
    field = a[len("--config."):].split("=", 1)[0]
    if field in fields or any(f.startswith(field + ".") for f in fields):
      continue
    close = difflib.get_close_matches(field, list(fields), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{a}: the config has no field {field!r}{hint}; see --help for the fields."
  return None


def run(main_fn: Callable[[list[str]], None], doc: str, modules: Sequence[str],
        keep_overrides_out: bool = False) -> None:
  """``app.run(main_fn)`` with ``--help`` (every flag of ``modules`` and the
  config's fields, exit 0) and one-line errors for bad flags.

  ``keep_overrides_out``: the ``--config.<field>`` arguments are not parsed
  here but handed to ``main_fn`` with the rest of argv (sweep and compare
  pass them on to each run); otherwise ``config_flags`` applies them.
  """
  argv = list(sys.argv)
  spec = _flag_value(argv, "config")
  if spec is None and "config" in flags.FLAGS and isinstance(flags.FLAGS["config"].default, str):
    spec = flags.FLAGS["config"].default  # sweep and compare default to configs/default.py
  if any(a in HELP_ARGS for a in argv[1:]):
    sys.stdout.write(help_text(doc, modules, spec))
    sys.exit(0)
  passed = config_overrides(argv) if keep_overrides_out else []
  if keep_overrides_out:
    sys.argv = [a for a in argv if not a.startswith("--config.")]

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as e:
      lines = [l for l in str(e).splitlines() if l.strip()]
      if any(l.startswith("Traceback") for l in lines):  # config_flags quotes the config file's traceback
        lines = [lines[0].rstrip(":"), lines[-1]]
      sys.exit(f"csq_jax: error: {' '.join(lines).rstrip('.')}. See --help.")
    except Exception as e:  # noqa: BLE001  (config_flags: a bad config file or override)
      sys.exit("csq_jax: error: " + (unknown_override(args, spec) or
                                     f"--config={spec}: {type(e).__name__}: {e}. See --help."))

  def main(rest):
    try:
      return main_fn(list(rest) + passed)
    except app.UsageError as e:  # absl would print the whole usage text before it
      sys.exit(f"csq_jax: error: {e}")

  app.run(main, flags_parser=parse)
