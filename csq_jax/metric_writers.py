"""Per-epoch metrics to stdout, ``metrics.jsonl`` and TensorBoard (tensorboardX,
which needs no TensorFlow)."""

from __future__ import annotations

import json
import os
from typing import Any


def _jsonable(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


class MetricWriter:
  """Writes one record per epoch; ``truncate(epoch)`` drops records past a
  resumed checkpoint so the file matches the state being continued."""

  def __init__(self, workdir: str, tensorboard: bool = True, echo: bool = True):
    self.echo = echo
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate(self, last_epoch: int) -> None:
    records = [r for r in read_metrics(self.path) if r["epoch"] <= last_epoch]
    with open(self.path + ".tmp", "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
    os.replace(self.path + ".tmp", self.path)

  def write(self, epoch: int, metrics: dict[str, Any]) -> None:
    record = {"epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, float) and k != "epoch":
          self._tb.add_scalar(k, v, epoch)
      self._tb.flush()
    if self.echo:
      from tqdm.auto import tqdm

      shown = ("phase", "train_loss", "train_accuracy", "test_accuracy", "beta", "avg_bits", "compression")
      tqdm.write(f"epoch {epoch}: " + ", ".join(
          f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
          for k in shown if k in record))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class NullWriter:
  """``MetricWriter``'s interface writing nothing: processes other than 0 of a
  multi-host run (process 0 writes for all)."""

  def truncate(self, last_epoch: int) -> None:
    del last_epoch

  def write(self, epoch: int, metrics: dict[str, Any]) -> None:
    del epoch, metrics

  def close(self) -> None:
    pass


def read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
