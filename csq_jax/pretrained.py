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

The ``torch.save`` reader (``read_torch_state_dict``) unpickles the zip
archive's ``data.pkl`` with a restricted ``pickle.Unpickler``: storages map to
numpy arrays read from the archive (``persistent_load``), the tensor rebuild
functions to numpy strided views (copied), ``collections.OrderedDict`` to
itself, and every other global to an inert placeholder, so no code from the
file runs.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from csq_jax import checkpoint, transform


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
  if not zipfile.is_zipfile(path):
    raise PretrainedError(
        f"{path}: not a zip archive written by torch.save (torch >= 1.6); re-save it with"
        " torch.save(model.state_dict(), path) or as .safetensors."
    )
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl")]
    if not pickles or any(n.endswith("constants.pkl") for n in names):
      raise PretrainedError(
          f"{path}: a TorchScript or unknown archive, not a torch.save state_dict; save"
          " model.state_dict() with torch.save or as .safetensors."
      )
    pkl = min(pickles, key=len)
    prefix = pkl[: -len("data.pkl")]
    byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    with archive.open(pkl) as f:
      obj = _TorchUnpickler(f, archive, prefix, "<" if byteorder == "little" else ">", path).load()
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


_NUMPY_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
# torch's legacy typed-storage classes, named in the pickle (``torch.FloatStorage``).
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "UntypedStorage": "uint8",  # bytes; _rebuild_tensor_v3 names the dtype
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: str


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  dtype: str


@dataclasses.dataclass(frozen=True)
class _Storage:
  data: np.ndarray  # flat, of the storage's dtype and the file's byte order


class _Opaque:
  """Stands for any object of a class the reader does not know (optimizer
  state, argparse.Namespace, ...): takes any construction and state, runs no
  code."""

  def __new__(cls, *args, **kwargs):
    return super().__new__(cls)

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass

  def __setitem__(self, key, value):
    pass

  def append(self, value):
    pass

  def extend(self, values):
    pass


def _opaque(module: str, name: str) -> type:
  return type(f"{module}.{name}", (_Opaque,), {})


class _TorchUnpickler(pickle.Unpickler):
  """``data.pkl`` of a torch.save archive, tensors as numpy arrays."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, path: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder, self._path = archive, prefix, byteorder, path
    self._storages: dict[str, bytes] = {}

  def find_class(self, module: str, name: str):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return self._rebuild_tensor_v2
    if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
      return self._rebuild_tensor_v3
    if (module, name) in (("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state")):
      return lambda data, *args: data
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
      return lambda func, new_type, args, state: func(*args)
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _NUMPY_DTYPES:
      return _TorchDtype(name)
    if (module, name) == ("torch", "Size"):
      return tuple
    return _opaque(module, name)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise PretrainedError(f"{self._path}: unknown persistent id {pid!r} in data.pkl; not a torch.save file?")
    _, storage_type, key, _location, _numel = pid
    if not isinstance(storage_type, _StorageType):
      raise PretrainedError(
          f"{self._path}: storage of unsupported type {getattr(storage_type, '__name__', storage_type)}"
          f"; supported dtypes: {sorted(_NUMPY_DTYPES)}. Convert the tensors (e.g. .float()) and re-save."
      )
    if key not in self._storages:
      self._storages[key] = self._archive.read(f"{self._prefix}data/{key}")
    dtype = np.dtype(_NUMPY_DTYPES[storage_type.dtype]).newbyteorder(self._byteorder)
    raw = self._storages[key]
    return _Storage(np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize))

  def _tensor(self, storage: _Storage, offset: int, size, stride) -> np.ndarray:
    flat, size, stride = storage.data, tuple(size), tuple(stride)
    if 0 in size:
      return np.zeros(size, flat.dtype.newbyteorder("="))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size or min(stride, default=0) < 0:
      raise PretrainedError(f"{self._path}: a tensor of shape {size} lies outside its storage; the file is corrupt.")
    view = np.lib.stride_tricks.as_strided(flat[offset:], size, [s * flat.itemsize for s in stride])
    return np.array(view, dtype=flat.dtype.newbyteorder("="), order="C")  # a copy: no view of the file

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return self._tensor(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _TorchDtype):
      raise PretrainedError(
          f"{self._path}: a tensor of unsupported dtype {dtype}; supported: {sorted(_NUMPY_DTYPES)}."
          " Convert it (e.g. .float()) and re-save."
      )
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype.dtype]).newbyteorder(self._byteorder)
    raw = storage.data  # untyped: bytes
    return self._tensor(_Storage(raw[: raw.size - raw.size % np_dtype.itemsize].view(np_dtype)), offset, size, stride)


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
