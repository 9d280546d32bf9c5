"""Writes the ``torch.save`` fixtures of ``tests/test_pretrained.py``.

Needs torch (not a dependency of csq_jax; run it in a separate venv, e.g.
``python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch``):

    /tmp/torchvenv/bin/python tests/data/make_torch_fixture.py

``torch_checkpoint.pt``: a training-script checkpoint ``{"epoch", "args",
"model": DataParallel state_dict}`` of a tiny conv/BN/linear net plus tensors
that exercise the reader: float16, bfloat16, int64, bool, uint16 and
float8 (``_rebuild_tensor_v3``) storages, a 0-d tensor, an ``nn.Parameter``,
a transposed (non-contiguous) view and an offset slice that share one
storage. ``torch_plain.pth``: a bare ``state_dict`` (OrderedDict, no wrapper).
``torch_expected.npz``: every tensor's values as float64 (key = the
state_dict key without ``module.``) and its torch dtype, as ``torch.load``
reads them; and the tiny net's eval-mode output on a random NCHW input.
"""

import argparse
import collections
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
  )
  with torch.no_grad():  # non-trivial running statistics
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net[1].num_batches_tracked += 7
  state = collections.OrderedDict(net.state_dict())
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8 - 0.7
  state["view.base"] = base
  state["view.transposed"] = base.t()  # strides (1, 4) into the same storage
  state["view.offset"] = base[1:, 1:3]  # storage offset 5, strides (4, 1)
  state["dtype.f16"] = torch.tensor([1.5, -2.25, 65504.0, 1e-4], dtype=torch.float16)
  state["dtype.bf16"] = torch.tensor([[1.5, -2.25, 3.0e38], [1e-3, 0.0, -7.0]], dtype=torch.bfloat16)
  state["dtype.i64"] = torch.tensor([-(2**40), 3, 0], dtype=torch.int64)
  state["dtype.bool"] = torch.tensor([True, False, True])
  state["dtype.u16"] = torch.tensor([1, 65535], dtype=torch.uint16)
  state["dtype.f8"] = torch.tensor([0.5, -1.0, 448.0], dtype=torch.float8_e4m3fn)
  state["dtype.scalar"] = torch.tensor(2.5)
  state["param"] = torch.nn.Parameter(torch.tensor([0.25, -0.5]))
  wrapped = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
  checkpoint = {"epoch": 3, "args": argparse.Namespace(lr=0.1, arch="tiny"), "model": wrapped}
  torch.save(checkpoint, os.path.join(HERE, "torch_checkpoint.pt"))
  torch.save(net.state_dict(), os.path.join(HERE, "torch_plain.pth"))

  expected = {}
  for k, v in state.items():
    v = v.detach()
    expected[f"value:{k}"] = v.to(torch.float64).numpy() if v.dtype != torch.bool else v.numpy()
    expected[f"dtype:{k}"] = np.array(str(v.dtype).removeprefix("torch."))
  # What torch itself reads back: the file is consistent with the values above.
  loaded = torch.load(os.path.join(HERE, "torch_checkpoint.pt"), weights_only=False)["model"]
  for k, v in state.items():
    assert torch.equal(loaded[f"module.{k}"].to(torch.float64), v.detach().to(torch.float64)), k
  net.eval()
  x = torch.randn(2, 3, 3, 3)
  with torch.no_grad():
    expected["forward:input"] = x.numpy()
    expected["forward:output"] = net(x).numpy()
  np.savez_compressed(os.path.join(HERE, "torch_expected.npz"), **expected)


if __name__ == "__main__":
  main()
