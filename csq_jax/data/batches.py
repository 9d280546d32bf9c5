"""Batches of a ``Dataset`` as ``grain.MapDataset``s, and iterating them.

Batch ``i`` of an epoch is a pure function of ``(seed, epoch, i)`` (see
``train_batches``), so a run resumes mid-epoch by index and several hosts read
disjoint rows of the same global batches. ``to_iterator`` bounds host-side
read-ahead, ``prefetch_to_device`` the transfers in flight.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import grain
import numpy as np

from csq_jax.data.dataset import DataError, Dataset


def _to_batch(ds: Dataset, batch, rng=None, train: bool = False):
  images = batch["image"]
  if train and ds.augment is not None:
    images = ds.augment(images, rng)
  return {"image": ds.normalize(images), "label": batch["label"].astype(np.int32)}


def epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index {process_index} is not in [0, process_count={process_count}).")
  if batch_size % process_count:
    raise DataError(
        f"batch_size {batch_size} is not divisible by the {process_count} processes; use a multiple of {process_count}."
    )
  return batch_size // process_count


def train_batches(
    ds: Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
  """This process's training batches of the epoch, from batch ``start`` on.

  ``batch_size`` is the global batch. Global batch ``i`` is a pure function of
  ``(seed, epoch, i)``: the epoch's shuffle and the random transforms are
  seeded by ``(seed, epoch)`` and the example's position (per-example
  ``train_map``) or the batch's index (batch-wise ``augment``). Process
  ``process_index`` of ``process_count`` gets rows ``[p * b, (p + 1) * b)``,
  ``b = batch_size / process_count``, of each, so the processes together see
  exactly the single-process batches. The first ``start`` batches are skipped
  by index, without reading or transforming them (resuming mid-epoch). The
  last incomplete global batch is dropped, so every step sees ``batch_size``
  examples and the step is compiled once. ``len()`` is
  ``steps_per_epoch - start``.
  """
  rows = _rows_per_process(batch_size, process_index, process_count)
  if ds.num_train < batch_size:
    raise DataError(f"{ds.name} has {ds.num_train} training examples, fewer than batch_size={batch_size}.")
  num_batches = steps_per_epoch(ds, batch_size)
  if not 0 <= start <= num_batches:
    raise DataError(f"start={start} is outside the {num_batches} batches of an epoch of {ds.name}.")
  s = epoch_seed(seed, epoch)
  examples = grain.MapDataset.source(ds.train).shuffle(seed=s)
  if ds.train_map is None:
    # One generator per global batch: every process makes the whole global
    # batch and keeps its rows (the in-memory sets augmented batch-wise are small).
    batches = examples.batch(batch_size, drop_remainder=True).random_map(
        lambda b, rng: _to_batch(ds, b, rng, train=True), seed=s
    )
    if process_count > 1:
      lo = process_index * rows
      batches = batches.map(lambda b: {k: v[lo:lo + rows] for k, v in b.items()})
  else:
    # One generator per example: a process reads and transforms only its rows,
    # the sub-batches p, p + P, p + 2P, ... of size b.
    batches = (
        examples.random_map(ds.train_map, seed=s)
        .batch(rows, drop_remainder=True)[process_index::process_count][:num_batches]
        .map(lambda b: _to_batch(ds, b))
    )
  return batches[start:]


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
  return ds.num_train // batch_size


def _masked_batch(ds: Dataset, batch) -> dict[str, np.ndarray]:
  """Normalized batch with the padding rows (``mask == 0``) zeroed."""
  mask = batch["mask"]
  b = _to_batch(ds, batch)
  out = {k: np.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)) > 0, v, np.zeros((), v.dtype)) for k, v in b.items()}
  out["mask"] = mask
  return out


def eval_batches(ds: Dataset, batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Test batches padded to ``batch_size``; ``mask`` marks the real examples
  (padding rows are zeros). With ``process_count`` processes, process ``p``
  gets rows ``[p * b, (p + 1) * b)`` of each global batch, as in
  ``train_batches``."""
  rows = _rows_per_process(batch_size, process_index, process_count)
  n = ds.num_test
  examples = grain.MapDataset.source(ds.test)
  if ds.eval_map is not None:
    examples = examples.map(ds.eval_map)
  num_batches = -(-n // batch_size)
  # Padding rows repeat a real example (no shape to guess) and are zeroed after.
  padded = grain.MapDataset.range(num_batches * batch_size).map(
      lambda g: {**examples[g % n], "mask": np.float32(g < n)}
  )
  return padded.batch(rows)[process_index::process_count].map(lambda b: _masked_batch(ds, b))


def to_iterator(batches: grain.MapDataset, workers: int = 0, prefetch: int = 2) -> grain.DatasetIterator:
  """Iterate ``batches`` in order, making up to ``prefetch`` batches ahead in
  as many threads of this process (``workers=0``), or in ``workers`` processes
  (grain's ``mp_prefetch``; worker ``k`` makes batches ``k, k + workers, ...``).

  The config knobs are ``data_workers`` and ``prefetch_batches``. Scripts that
  use workers need an ``if __name__ == "__main__":`` guard (workers are
  spawned and re-import ``__main__``); ``close()`` the iterator to stop them
  early.
  """
  prefetch = max(int(prefetch), 0)
  if workers <= 0:
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
  from absl import flags

  if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults outside absl.app)
    flags.FLAGS.mark_as_parsed()
  per_worker = max(1, -(-prefetch // workers))
  return iter(
      batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=per_worker)
      )
  )


def prefetch_to_device(iterator: Iterable[Any], size: int = 2, sharding=None) -> Iterator[Any]:
  """Yield the batches of ``iterator`` as device arrays, keeping ``size``
  transfers in flight ahead of the consumer.

  Without ``sharding`` each batch goes to the default device
  (``jax.device_put``); with a ``jax.sharding.Sharding`` over the batch axis
  each process's rows become its part of one global array
  (``jax.make_array_from_process_local_data``).
  """
  import jax

  if sharding is None:
    put = jax.device_put
  else:
    def put(batch):
      return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

  queue = collections.deque()
  it = iter(iterator)

  def enqueue(k: int):
    for _ in range(k):
      batch = next(it, None)
      if batch is None:
        return
      queue.append(put(batch))

  enqueue(max(size, 1))
  while queue:
    yield queue.popleft()
    enqueue(1)
