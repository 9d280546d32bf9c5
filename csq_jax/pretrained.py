"""Float weights from outside a csq_jax run: a model's float Flax variables
``{"params", "batch_stats"}`` from a PyTorch ``state_dict`` (``.safetensors``,
or a ``torch.save`` ``.pth``/``.pt``/``.bin`` read without torch) or from an
orbax checkpoint of a ``{"params", "batch_stats"}`` pytree.

A quantized run starts from them (``config.init_from``, ``restore_init``):
``transform.quantize_params`` then derives each quantized kernel's parameters
from its float value, the bit planes of its ``n``-bit linear quantization
(CSQ Eq. 5 with every gate on, BSQ Eq. 1) or the float latent weight
(MSQ, STE).

PyTorch names become Flax paths through one table of ``NameRule``s per model
family (``FAMILIES``): a regex matched in full against the torch *module* name
(``layer2.0.downsample.0``; the first full match wins, as in ``transform``'s
rules) gives the Flax module path (``stage2_block0/shortcut_conv``) and the
layer kind, and the kind (``LAYER_KINDS``) says what each of the module's
tensors becomes: conv ``weight`` OIHW -> ``kernel`` HWIO, linear ``weight``
``(out, in)`` -> ``kernel`` ``(in, out)``, BN ``weight``/``bias`` ->
``scale``/``bias`` (params) and ``running_mean``/``running_var`` ->
``mean``/``var`` (batch_stats); ``num_batches_tracked`` is dropped. A new
family (MobileNetV3, DeiT with timm's names) is a new table. Every leaf of the
model is filled exactly once with its own shape, or one ``PretrainedError``
lists what is missing, unexpected or mis-shaped.

``torch.save`` files are read without torch by ``torch_pickle``, which runs
no code from the file; ``read_torch_state_dict`` finds the state_dict inside.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from csq_jax import checkpoint, torch_pickle, transform


class PretrainedError(checkpoint.CheckpointError):
  """Weights that cannot initialize this model; the message says what to do."""


TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Wrappers around a state_dict in training scripts' checkpoints, tried in order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes of every key added by DataParallel/DDP (``module.``) and torch.compile.
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------
# Reading a PyTorch state_dict


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """``{torch name: array}`` of a ``.safetensors`` or ``torch.save`` file,
  wrapper prefixes (``module.``) removed."""
  lower = str(path).lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)
  if lower.endswith(TORCH_SUFFIXES):
    return read_torch_state_dict(path)
  raise PretrainedError(
      f"{path}: unknown weight file type; expected {SAFETENSORS_SUFFIXES + TORCH_SUFFIXES}"
      " (a PyTorch state_dict) or an orbax checkpoint directory."
  )


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A ``.safetensors`` file's tensors as numpy arrays (bfloat16 as ml_dtypes')."""
  from safetensors.numpy import load_file

  _check_file(path)
  try:
    tensors = load_file(path)
  except Exception as e:  # the rust reader raises its own error types
    raise PretrainedError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}).") from e
  return strip_prefixes({k: np.asarray(v) for k, v in tensors.items()})


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """The ``state_dict`` inside a ``torch.save`` file (zip format, torch >= 1.6),
  read without torch.

  The saved object may be the state_dict itself or a training checkpoint that
  wraps it (``{"state_dict": ...}``, ``{"model": ...}``, ...; see
  ``WRAPPER_KEYS``). Tensors come back as C-contiguous numpy arrays of their
  own dtype (bfloat16/float8 as ml_dtypes'), views (transposes, slices,
  storage offsets) resolved; ``module.``/``_orig_mod.`` prefixes are removed.

  Raises:
    PretrainedError: not a torch zip archive, no state_dict inside, or a
      tensor outside its storage.
  """
  _check_file(path)
  try:
    obj = torch_pickle.load(path)
  except torch_pickle.TorchPickleError as e:  # one error type for every way init weights fail
    raise PretrainedError(str(e)) from e
  state_dict = _find_state_dict(obj)
  if state_dict is None:
    keys = list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise PretrainedError(
        f"{path}: holds no state_dict (a dict of tensors); found {keys}. Save"
        " model.state_dict(), or one of the wrapper keys " + "/".join(WRAPPER_KEYS) + "."
    )
  return strip_prefixes(dict(state_dict))


def strip_prefixes(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Remove a prefix that every key has (``module.`` of DataParallel/DDP,
  ``_orig_mod.`` of torch.compile), repeatedly."""
  while state_dict:
    prefix = next((p for p in STRIPPED_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
    if prefix is None:
      break
    state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
  return state_dict


def _check_file(path: str) -> None:
  if not os.path.isfile(path):
    raise PretrainedError(f"init weights {path!r} do not exist; check the path.")


def _find_state_dict(obj: Any) -> Mapping[str, np.ndarray] | None:
  if isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    return obj
  if isinstance(obj, Mapping):
    for key in WRAPPER_KEYS:
      if key in obj and (found := _find_state_dict(obj[key])) is not None:
        return found
  return None


# ----------------------------------------------------------------------------
# PyTorch names -> Flax paths


@dataclasses.dataclass(frozen=True)
class NameRule:
  """One torch module -> one Flax module.

  Attributes:
    pattern: regex matched in full against the torch module name (the key
      without its last ``.``-part), e.g. ``layer(\\d+)\\.(\\d+)\\.conv(\\d)``.
    target: the Flax module path, a ``re`` template over ``pattern``'s groups,
      e.g. ``stage\\1_block\\2/conv\\3``.
    kind: a key of ``LAYER_KINDS``: how the module's tensors become leaves.
  """

  pattern: str
  target: str
  kind: str


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """Conv kernel: torch ``(out, in/groups, kh, kw)`` -> Flax ``(kh, kw, in/groups, out)``."""
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _out_in_to_in_out(w: np.ndarray) -> np.ndarray:
  """Dense kernel: torch ``(out, in)`` -> Flax ``(in, out)``."""
  return w.T if w.ndim == 2 else w


# kind -> {torch tensor name: (collection, Flax leaf name, conversion or None) or None (dropped)}
LAYER_KINDS: dict[str, dict[str, tuple[str, str, Callable[[np.ndarray], np.ndarray] | None] | None]] = {
    "conv": {"weight": ("params", "kernel", _oihw_to_hwio), "bias": ("params", "bias", None)},
    "linear": {"weight": ("params", "kernel", _out_in_to_in_out), "bias": ("params", "bias", None)},
    "batchnorm": {
        "weight": ("params", "scale", None), "bias": ("params", "bias", None),
        "running_mean": ("batch_stats", "mean", None), "running_var": ("batch_stats", "var", None),
        "num_batches_tracked": None,
    },
    "layernorm": {"weight": ("params", "scale", None), "bias": ("params", "bias", None)},
}

# torchvision's (and timm's) ResNet names -> models/resnet_imagenet.py.
TORCHVISION_RESNET = (
    NameRule(r"conv1", "conv_init", "conv"),
    NameRule(r"bn1", "bn_init", "batchnorm"),
    NameRule(r"layer(\d+)\.(\d+)\.conv(\d)", r"stage\1_block\2/conv\3", "conv"),
    NameRule(r"layer(\d+)\.(\d+)\.bn(\d)", r"stage\1_block\2/bn\3", "batchnorm"),
    NameRule(r"layer(\d+)\.(\d+)\.downsample\.0", r"stage\1_block\2/shortcut_conv", "conv"),
    NameRule(r"layer(\d+)\.(\d+)\.downsample\.1", r"stage\1_block\2/shortcut_bn", "batchnorm"),
    NameRule(r"fc", "head", "linear"),
)
FAMILIES: dict[str, tuple[NameRule, ...]] = {"torchvision_resnet": TORCHVISION_RESNET}
MODEL_FAMILIES: dict[str, str] = {
    "resnet18": "torchvision_resnet",
    "resnet34": "torchvision_resnet",
    "resnet50": "torchvision_resnet",
}


@dataclasses.dataclass
class Mapped:
  """Torch tensors renamed and converted to Flax leaves.

  Attributes:
    leaves: ``{"params/stage1_block0/conv1/kernel": ("layer1.0.conv1.weight
      (64, 64, 3, 3)", HWIO array)}``: the torch key and shape, the Flax leaf.
    unexpected: torch keys that no rule or layer kind maps.
    duplicates: ``(torch key, Flax path)`` of leaves that a second key filled.
  """

  leaves: dict[str, tuple[str, np.ndarray]]
  unexpected: list[str]
  duplicates: list[tuple[str, str]]


def map_torch_names(state_dict: Mapping[str, np.ndarray], rules: Sequence[NameRule]) -> Mapped:
  """Rename and convert a torch ``state_dict`` to Flax leaves by ``rules``."""
  compiled = [(re.compile(r.pattern), r) for r in rules]
  out = Mapped({}, [], [])
  for key, value in state_dict.items():
    module, _, tensor = key.rpartition(".")
    match = next(((m, r) for p, r in compiled if (m := p.fullmatch(module))), None)
    if match is None:
      out.unexpected.append(key)
      continue
    m, rule = match
    kinds = LAYER_KINDS[rule.kind]
    if tensor not in kinds:
      out.unexpected.append(key)
      continue
    if kinds[tensor] is None:  # e.g. num_batches_tracked
      continue
    collection, leaf, convert = kinds[tensor]
    path = f"{collection}/{m.expand(rule.target)}/{leaf}"
    if path in out.leaves:
      out.duplicates.append((key, path))
      continue
    out.leaves[path] = (f"{key} {tuple(np.shape(value))}", convert(value) if convert else value)
  return out


def family_rules(model_name: str) -> tuple[NameRule, ...]:
  if model_name not in MODEL_FAMILIES:
    raise PretrainedError(
        f"No PyTorch name mapping for model {model_name!r}; PyTorch weights load into"
        f" {sorted(MODEL_FAMILIES)}. For other models use an orbax checkpoint or the workdir of a"
        " --config.method=fp run (or add a family to pretrained.FAMILIES)."
    )
  return FAMILIES[MODEL_FAMILIES[model_name]]


# ----------------------------------------------------------------------------
# Filling a model's variables


def fill_variables(
    template_variables: Any,
    leaves: Mapping[str, tuple[str, np.ndarray]],
    source: str,
    keep_init: Sequence[str] = (),
    unexpected: Sequence[str] = (),
    duplicates: Sequence[tuple[str, str]] = (),
) -> Any:
  """``template_variables`` with every leaf replaced by ``leaves[path]``.

  Args:
    template_variables: the model's variables (``model.init``), e.g.
      ``{"params": ..., "batch_stats": ...}``; arrays or ShapeDtypeStructs.
    leaves: ``{"params/head/kernel": (source, array)}``, the array in Flax
      layout, ``source`` its name for messages (``fc.weight (1000, 512)``).
    source: the file, for messages.
    keep_init: regexes matched in full against a leaf's path without its
      collection (``head/kernel``, as in ``transform``'s rules); those leaves
      keep the template's value and their entries in ``leaves`` are ignored
      (e.g. ``("head/.*",)``: a classifier head for another number of classes).
    unexpected, duplicates: problems found while mapping names, reported with
      the others.

  Raises:
    PretrainedError: a leaf missing, an entry without a leaf, a shape or dtype
      that does not fit, or a leaf filled twice; one message names the first
      few of each.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(template_variables)
  keep = [re.compile(p) for p in keep_init]
  paths = [transform.path_str(p) for p, _ in flat]
  known = set(paths)
  unexpected = list(unexpected) + [f"{src} -> {p}" for p, (src, _) in leaves.items() if p not in known]
  missing, mismatched, out, kept = [], [], [], 0
  for path, (_, leaf) in zip(paths, flat):
    if any(k.fullmatch(path.partition("/")[2]) for k in keep):
      out.append(leaf)
      kept += 1
    elif path not in leaves:
      missing.append(path)
      out.append(leaf)
    elif np.shape(value := leaves[path][1]) != np.shape(leaf) or not jnp.issubdtype(value.dtype, jnp.floating):
      mismatched.append(f"{leaves[path][0]} -> {path}: {np.shape(value)} {value.dtype}, the model has {np.shape(leaf)}")
      out.append(leaf)
    else:
      out.append(jnp.asarray(value, dtype=leaf.dtype))
  params_first = lambda items: sorted(items, key=lambda item: "params/" not in item)  # stable
  problems = [
      (f"{len(missing)} leaves not filled", params_first(missing)),
      (f"{len(unexpected)} unexpected tensors", unexpected),
      (f"{len(mismatched)} shape/dtype mismatches", params_first(mismatched)),
      (f"{len(duplicates)} leaves filled twice", [f"{k} -> {p}" for k, p in duplicates]),
  ]
  problems = [(head, items) for head, items in problems if items]
  if problems:
    detail = "; ".join(f"{head} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})"
                       for head, items in problems)
    raise PretrainedError(
        f"{source} does not fit the model: {detail}. Check that the model (--config.model) is the"
        " checkpoint's architecture; to leave a layer at its init (e.g. a head for another number"
        " of classes) pass keep_init=('head/.*',) (config.init_from_keep)."
    )
  logging.info("Loaded %d float leaves from %s (%d kept at init).", len(paths) - kept, source, kept)
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------
# Orbax checkpoints


ORBAX_MARKS = ("_METADATA", "manifest.ocdbt", "checkpoint")  # files of a checkpoint's folder
# Items of a CheckpointManager step folder that may hold the variables: the
# single-item default, and our train state (checkpoint.save; float runs only).
ORBAX_ITEMS = ("default", "state")


def _orbax_item(path: str) -> str | None:
  """The folder of ``path``'s orbax checkpoint: ``path`` or one of its items."""
  for candidate in (path,) + tuple(os.path.join(path, item) for item in ORBAX_ITEMS):
    if os.path.isdir(candidate) and any(os.path.exists(os.path.join(candidate, m)) for m in ORBAX_MARKS):
      return candidate
  return None


def is_orbax_dir(path: str) -> bool:
  """Whether ``path`` is an orbax checkpoint directory or a CheckpointManager
  step folder with such an item (``ORBAX_ITEMS``)."""
  return _orbax_item(path) is not None


def read_orbax_variables(path: str) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` numpy pytrees of an orbax checkpoint
  (StandardCheckpointer / PyTreeCheckpointer) that holds them, e.g. a train
  state; a tree without ``params`` is taken as the params themselves."""
  import orbax.checkpoint as ocp

  item = _orbax_item(path)
  if item is None:
    raise PretrainedError(f"{path}: not an orbax checkpoint directory; point at the checkpoint's folder.")
  path = os.path.abspath(item)
  ckptr = ocp.PyTreeCheckpointer()
  try:
    metadata = ckptr.metadata(path)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:
    raise PretrainedError(f"{path}: not a readable orbax checkpoint ({type(e).__name__}: {e}).") from e
  if isinstance(tree, Mapping) and "params" in tree:
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
  return {"params": tree, "batch_stats": {}}


# ----------------------------------------------------------------------------
# Entry points


def load_float_variables(
    path: str, model_name: str, template_variables: Any, keep_init: Sequence[str] = ()
) -> dict[str, Any]:
  """A model's float variables from a PyTorch state_dict file or an orbax
  checkpoint directory.

  Args:
    path: ``.safetensors``, ``.pth``/``.pt``/``.bin`` (torch.save; names of
      ``model_name``'s family, e.g. torchvision's), or an orbax checkpoint
      directory of ``{"params", "batch_stats"}`` (our Flax names).
    model_name: a ``models.MODELS`` name; picks the PyTorch name mapping.
    template_variables: ``model.init(...)``'s float variables (their structure,
      shapes and dtypes; the values of ``keep_init`` leaves).
    keep_init: regexes of leaf paths (``head/.*``) left at the template's value.

  Returns:
    ``{"params", "batch_stats"}`` in the template's structure and dtypes.

  Raises:
    PretrainedError: unreadable file, or weights that do not fit the model.
  """
  template = {"params": template_variables["params"], "batch_stats": template_variables.get("batch_stats", {})}
  if os.path.isdir(path):
    flat = jax.tree_util.tree_flatten_with_path(read_orbax_variables(path))[0]
    leaves = {transform.path_str(p): (transform.path_str(p), np.asarray(v)) for p, v in flat}
    return fill_variables(template, leaves, path, keep_init)
  rules = family_rules(model_name)
  mapped = map_torch_names(read_state_dict(path), rules)
  return fill_variables(template, mapped.leaves, path, keep_init, mapped.unexpected, mapped.duplicates)


def restore_init(config, template_state) -> tuple[Any, Any]:
  """``(params, batch_stats)`` that ``config.init_from`` names, for ``train.init_state``.

  ``init_from`` is the workdir of a float run (it has ``checkpoints/``:
  ``checkpoint.restore_float_weights``), a PyTorch state_dict file
  (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) or an orbax checkpoint
  directory. ``template_state`` is an ``fp`` init state of the model
  (``TrainState``). ``config.init_from_keep`` (optional) is ``keep_init``.
  """
  path = config.init_from
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return checkpoint.restore_float_weights(path, template_state, config)
  if not (os.path.isfile(path) or is_orbax_dir(path)):
    raise PretrainedError(
        f"init_from={path!r} is neither the workdir of a float run (with checkpoints/), a weight file"
        f" ({', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}) nor an orbax checkpoint directory."
        f" Train a float model first (--config.method=fp --workdir={path}) or fix or clear init_from."
    )
  template = {"params": template_state.params, "batch_stats": template_state.batch_stats}
  variables = load_float_variables(path, config.model, template, tuple(config.get("init_from_keep", ())))
  return variables["params"], variables["batch_stats"]
