"""Config checks before a run starts: one clear ``ConfigError`` per mistake.

The shared knobs are range-checked here (``FIELD_RANGES``); the method's
own config section is checked by its class (``Method.validate``), so this
module names no method.
"""

from __future__ import annotations

import re

import jax
import ml_collections

from csq_jax import allowed_bits, budget, methods, models, report, sharding, transform
from csq_jax.methods.base import at_least, fraction, int_at_least, number
from csq_jax.quantizers import activations
from csq_jax.train_state import COMPUTE_DTYPES, OPTIMIZERS


class ConfigError(ValueError):
  """A config value that cannot run; the message says what to choose instead."""


# (field, check(value, config), what is expected): numeric fields validated up front.
FIELD_RANGES = (
    ("seed", int_at_least(0), "an integer >= 0"),
    ("image_size", int_at_least(1), "an integer >= 1"),
    ("data_workers", int_at_least(0), "an integer >= 0 (0: threads in this process)"),
    ("prefetch_batches", int_at_least(0), "an integer >= 0"),
    ("num_epochs", int_at_least(1), "an integer >= 1"),
    ("finetune_epochs", int_at_least(0), "an integer >= 0"),
    ("batch_size", int_at_least(1), "an integer >= 1"),
    ("eval_batch_size", int_at_least(1), "an integer >= 1 (test examples per evaluation batch)"),
    ("learning_rate", at_least(0.0, strict=True), "a number > 0"),
    ("finetune_learning_rate", lambda x, c: c.finetune_epochs == 0 or at_least(0.0, True)(x, c),
     "a number > 0 when finetune_epochs > 0"),
    ("warmup_epochs", lambda x, c: number(x) and 0 <= x < c.num_epochs, "a number in [0, num_epochs)"),
    ("momentum", fraction, "a number in [0, 1)"),
    ("weight_decay", at_least(0.0), "a number >= 0"),
    ("lr_step_factor", at_least(0.0, strict=True), "a number > 0"),
    ("beta0", at_least(0.0, strict=True), "a number > 0"),
    ("beta_max", at_least(0.0, strict=True), "a number > 0"),
    ("finetune_beta0", at_least(0.0, strict=True), "a number > 0"),
    ("finetune_beta_max", at_least(0.0, strict=True), "a number > 0"),
    ("budget_tolerance", at_least(0.0), "a number >= 0"),
    ("act_bits", lambda x, c: isinstance(x, int) and 1 <= x <= 32, "an integer in [1, 32] (32: float activations)"),
    ("bn_recalibration_epochs", int_at_least(0), "an integer >= 0"),
    ("eval_every", int_at_least(1), "an integer >= 1 (epochs)"),
    ("keep_checkpoints", int_at_least(1), "an integer >= 1"),
    ("checkpoint_every_steps", int_at_least(0), "an integer >= 0 (0: at epoch ends only)"),
    ("checkpoint_every_epochs", int_at_least(1), "an integer >= 1"),
    ("check_finite_every_steps", int_at_least(1), "an integer >= 1"),
    ("fp_accuracy", lambda x, c: number(x) and (x == -1 or 0 <= x <= 1), "-1 (unknown) or a fraction in [0, 1]"),
    ("allow_resume_changes", lambda x, c: isinstance(x, str), "comma-separated config fields"),
)
LR_DECAYS = ("cosine", "step")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raise one clear ``ConfigError`` for a config that cannot run."""
  if config.model not in models.MODELS:
    raise ConfigError(f"Unknown model {config.model!r}; expected one of {sorted(models.MODELS)}.")
  try:
    method = methods.resolve(config.method)
  except methods.UnknownMethodError as e:
    raise ConfigError(str(e)) from None
  method.add_section(config)
  renamed = [f"{old} is now {new}" for old, new in report.LEGACY_FIELDS.items() if old in config]
  if renamed:
    raise ConfigError(f"The config sets knobs that moved into their method's section: {'; '.join(renamed)}"
                      " (e.g. --config.csq.reg_strength=0.3).")
  if not 1 <= config.n_bits <= 16:
    raise ConfigError(f"n_bits must be in 1..16, got {config.n_bits}.")
  try:
    method.validate(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    budget.check_weighting(config.budget_weighting)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.act_bits != 32 and config.act_quantizer not in activations.ACTIVATIONS:
    raise ConfigError(f"Unknown act_quantizer {config.act_quantizer!r}; expected one of {activations.ACTIVATIONS}.")
  if config.num_epochs < 1 or config.finetune_epochs < 0:
    raise ConfigError("num_epochs must be >= 1 and finetune_epochs >= 0.")
  if config.batch_size < 1 or config.learning_rate <= 0:
    raise ConfigError("batch_size and learning_rate must be positive.")
  if config.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
    raise ConfigError(f"Unknown compute_dtype {config.compute_dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}.")
  if config.get("optimizer", "sgd") not in OPTIMIZERS:
    raise ConfigError(f"Unknown optimizer {config.optimizer!r}; expected one of {OPTIMIZERS}.")
  if config.lr_decay not in LR_DECAYS:
    raise ConfigError(f"Unknown lr_decay {config.lr_decay!r}; expected one of {LR_DECAYS}.")
  for field, ok, expected in FIELD_RANGES:
    if field in config and not ok(config[field], config):
      raise ConfigError(f"{field}={config[field]!r} is out of range: expected {expected}.")
  try:
    mesh = sharding.mesh_shape(config.get("mesh", sharding.DEFAULT_MESH), jax.device_count())
  except ValueError as e:
    raise ConfigError(str(e)) from e
  ways = mesh["data"] * mesh.get("fsdp", 1)
  if config.batch_size % ways or config.eval_batch_size % ways:
    raise ConfigError(f"batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be"
                      f" multiples of the {ways} data-parallel devices (mesh {mesh}); change them or the mesh.")
  try:
    rules = transform.rules_from_config(config.rules)
    methods.get(config).quantize_spec()
  except (ValueError, TypeError, re.error) as e:
    raise ConfigError(str(e)) from e
  _check_allowed_bits(config, method, rules)


def _check_allowed_bits(config, method, rules) -> None:
  """``allowed_bits`` parses, fits ``n_bits``, admits the target and every
  ``fixed`` rule's width."""
  try:
    allowed = allowed_bits.parse(config.get("allowed_bits", "any"))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not allowed or not method.quantizes:
    return
  if allowed[-1] > config.n_bits:
    raise ConfigError(f"allowed_bits {allowed} has widths above n_bits={config.n_bits}; raise n_bits or drop them.")
  if method.searches and config.target_bits < allowed[0]:
    raise ConfigError(f"target_bits={config.target_bits:g} is below the smallest allowed width {allowed[0]}"
                      f" (allowed_bits {allowed}): no layer can go that low; raise the target or allow a smaller"
                      " width.")
  if not method.searches and int(round(config.target_bits)) not in allowed:
    raise ConfigError(f"{config.method} trains every layer at target_bits={config.target_bits:g}, which"
                      f" allowed_bits {allowed} does not allow; set target_bits to one of {allowed}.")
  fixed = [(r.pattern, r.fixed_bits) for r in rules if r.action == "fixed" and r.fixed_bits not in allowed]
  if fixed:
    raise ConfigError(f"rules fix {fixed} at widths that allowed_bits {allowed} does not allow; fix them at one of"
                      f" {allowed}.")


def check_rules_quantize(config, rules_report: transform.TransformReport) -> None:
  """A quantizing method whose rules select no parameter would train (and
  report) a float model: a ``ConfigError`` naming the model's kernels."""
  if not methods.resolve(config.method).quantizes or rules_report.quantized_paths():
    return
  kernels = [p for p in rules_report.actions if p.endswith("kernel")] or list(rules_report.actions)
  raise ConfigError(
      f"config.rules {[tuple(r) for r in config.rules]} quantize no parameter of {config.model}, so method"
      f" {config.method} would train a float model. Write rules that match its kernels (e.g."
      f" {', '.join(kernels[:3])}; pattern '.*kernel' matches all), or a method that keeps float weights."
  )
