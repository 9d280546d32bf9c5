"""ResNet-20 training step: csq_jax (FP and CSQ) side by side with PyTorch.

What it measures
  One training step (forward, backward, SGD-momentum update) of ResNet-20 on
  CIFAR-shaped batches (32x32x3, 10 classes, option-B 1x1 shortcuts with BN):
  * csq_jax FP and CSQ (``method='fp'`` / ``'csq'``, ``--n_bits`` bit planes,
    learned bit selection, Eq. 5 of the CSQ paper, budget penalty on), built as
    ``train.train_and_evaluate`` builds them (``step_time.build``: the real
    ``make_train_step`` with its donated state);
  * the same net in PyTorch, written below: FP, and CSQ where every
    non-shortcut convolution's weight is Eq. 5,
    ``W = s/(2^n-1) * sum_b (f(m_p^b) - f(m_n^b)) 2^b f(m_B^b)``, with
    ``f`` the temperature sigmoid, plus a bit-count penalty.
  All four are timed on the same batch in this one process, interleaved step
  by step (one step of each per round), so that they share whatever else the
  machine is doing; medians over ``--steps`` rounds after ``--warmup``.

  With the fast convolution switched off (``CSQ_JAX_CONV=xla``, see
  ``csq_jax/models/conv.py``) csq_jax FP and CSQ are timed again (skipped with
  ``--quick``), and the wall time per epoch of the default job
  (``configs/default.py``) is estimated both ways as steps per epoch times the
  median step.

Usage
  python benchmarks/vs_pytorch.py [--batch_size=128] [--steps=10] [--warmup=2] [--quick] [--no_torch]
                                  [--torch_threads=N]

PyTorch is optional (``pip install -e ".[bench]"``); without it the PyTorch
rows are skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

CIFAR10_TRAIN_EXAMPLES = 50_000


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=10, help="timed rounds; medians are reported (default 10)")
  p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first call (default 2)")
  p.add_argument("--n_bits", type=int, default=8, help="CSQ bit planes (default 8)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="3 timed rounds, 1 warm-up, no XLA-conv comparison of ResNet-20")
  p.add_argument("--no_torch", action="store_true", help="skip PyTorch even if installed")
  p.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1,
                 help="torch.set_num_threads (default: all cores; on a busy machine PyTorch's OpenMP threads "
                      "can spin far longer than they work, so also try 1)")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup = 3, 1
  if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
    p.error("--batch_size and --steps must be >= 1, --warmup >= 0")
  args.model = "resnet20"
  return args


# ----------------------------------------------------------------------------
# PyTorch ResNet-20 (FP and CSQ), written here so the benchmark needs no other
# code; same architecture as csq_jax.models.resnet_cifar.


def torch_resnet20(n_bits: int | None, num_classes: int = 10):
  """ResNet-20; with ``n_bits`` every non-shortcut conv is a CSQ conv (Eq. 5)."""
  import torch
  from torch import nn
  import torch.nn.functional as F

  class CSQConv2d(nn.Module):
    """Conv whose weight is Eq. 5 of the relaxed bit planes (temperature ``beta``)."""

    def __init__(self, cin, cout, k, stride):
      super().__init__()
      w = torch.randn(cout, cin, k, k) * (2.0 / (cin * k * k)) ** 0.5
      scale = w.abs().max()
      q = torch.round(w.abs() / scale * (2**n_bits - 1)).long()
      bits = torch.stack([(q >> b) & 1 for b in range(n_bits)]).float()
      sign = (w >= 0).float()
      self.pos = nn.Parameter((2 * bits * sign - 1) * 2.0)
      self.neg = nn.Parameter((2 * bits * (1 - sign) - 1) * 2.0)
      self.mask = nn.Parameter(torch.full((n_bits,), 2.0))
      self.scale = nn.Parameter(scale.clone())
      self.register_buffer("place", 2.0 ** torch.arange(n_bits, dtype=torch.float32))
      self.stride, self.pad, self.beta = stride, k // 2, 1.0

    def weight(self):
      f = lambda m: torch.sigmoid(self.beta * m)
      coeff = (self.place * f(self.mask)).view(-1, 1, 1, 1, 1)
      return self.scale / (2**n_bits - 1) * ((f(self.pos) - f(self.neg)) * coeff).sum(0)

    def bits(self):
      return torch.sigmoid(self.beta * self.mask).sum() * self.pos[0].numel()

    def forward(self, x):
      return F.conv2d(x, self.weight(), stride=self.stride, padding=self.pad)

  def conv(cin, cout, k, stride):
    if n_bits is None:
      return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    return CSQConv2d(cin, cout, k, stride)

  class Block(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.conv2, self.bn2 = conv(cout, cout, 3, 1), nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5)
      self.shortcut = nn.Identity()
      if stride != 1 or cin != cout:  # float 1x1 projection, as csq_jax's default rules
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      return F.relu(self.shortcut(x) + self.bn2(self.conv2(y)))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv, self.bn = conv(3, 16, 3, 1), nn.BatchNorm2d(16)
      layers, cin = [], 16
      for i, width in enumerate((16, 32, 64)):
        for j in range(3):
          layers.append(Block(cin, width, 2 if (i > 0 and j == 0) else 1))
          cin = width
      self.layers = nn.Sequential(*layers)
      self.head = nn.Linear(64, num_classes)

    def forward(self, x):
      x = self.layers(F.relu(self.bn(self.conv(x))))
      return self.head(x.mean((2, 3)))

  torch.manual_seed(0)
  return Net()


def torch_step(n_bits, images, labels, threads: int):
  """A closure running one PyTorch training step of ResNet-20 (FP or CSQ)."""
  import torch
  import torch.nn.functional as F

  torch.set_num_threads(threads)
  net = torch_resnet20(n_bits).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels.astype("int64"))
  csq_convs = [m for m in net.modules() if hasattr(m, "bits")]

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    if csq_convs:  # budget penalty on the relaxed bit count, as csq_jax's regularizer
      loss = loss + 1e-6 * sum(m.bits() for m in csq_convs)
    loss.backward()
    opt.step()
    return loss

  return step


# ----------------------------------------------------------------------------
# csq_jax


def jax_step(method: str, args: argparse.Namespace, batch, conv_mode: str):
  """A closure running one csq_jax training step, compiled with
  ``CSQ_JAX_CONV=conv_mode`` (the knob is read while tracing)."""
  import jax
  import step_time

  old = os.environ.get("CSQ_JAX_CONV")
  os.environ["CSQ_JAX_CONV"] = conv_mode
  try:
    step, state = step_time.build(method, args)
    compiled = step.lower(state, batch).compile()
  finally:
    if old is None:
      os.environ.pop("CSQ_JAX_CONV")
    else:
      os.environ["CSQ_JAX_CONV"] = old
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return jax.block_until_ready(metrics)

  return run


def time_interleaved(steps: dict, warmup: int, rounds: int) -> dict:
  """Median wall and process-CPU seconds per step of each closure, run one
  after the other in every round."""
  import numpy as np

  for fn in steps.values():
    fn()
  for _ in range(warmup):
    for fn in steps.values():
      fn()
  wall = {k: [] for k in steps}
  cpu = {k: [] for k in steps}
  for _ in range(rounds):
    for k, fn in steps.items():
      t, c = time.perf_counter(), time.process_time()
      fn()
      wall[k].append(time.perf_counter() - t)
      cpu[k].append(time.process_time() - c)
  return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in steps}


def default_job_epoch(conv_modes, warmup: int, rounds: int) -> dict:
  """Seconds per epoch of the default job (configs/default.py) per conv mode:
  steps per epoch x median step of its real train step."""
  import jax
  import numpy as np

  from configs import default as default_config
  from csq_jax import data, methods, train

  config = default_config.get_config()
  ds = data.load_dataset(config)
  spe = data.steps_per_epoch(ds, config.batch_size)
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.standard_normal((config.batch_size,) + tuple(ds.image_shape)).astype(np.float32),
      "label": rng.integers(0, ds.num_classes, size=(config.batch_size,)).astype(np.int32),
  })
  steps = {}
  for mode in conv_modes:
    os.environ["CSQ_JAX_CONV"] = mode
    phases = train.make_phases(config, steps_per_epoch=spe)
    model = train.create_model(config, ds.num_classes, ds.image_shape)
    state, _ = train.init_state(config, model, ds.image_shape, phases[0], jax.random.key(config.seed))
    compiled = train.make_train_step(model, phases[0], methods.get(config)).lower(state, batch).compile()
    holder = [state]

    def run(compiled=compiled, holder=holder):
      holder[0], metrics = compiled(holder[0], batch)
      return jax.block_until_ready(metrics)

    steps[mode] = run
  os.environ.pop("CSQ_JAX_CONV", None)
  times = time_interleaved(steps, warmup, rounds)
  desc = f"{config.model} on {config.dataset}, method {config.method}, batch {config.batch_size}, {spe} steps/epoch"
  return {"desc": desc, **{m: times[m][0] * spe for m in conv_modes}}


def main(argv=None) -> None:
  args = parse_args(argv)
  import jax
  import numpy as np

  rng = np.random.default_rng(args.seed)
  images = rng.standard_normal((args.batch_size, 32, 32, 3), dtype=np.float32)
  labels = rng.integers(0, 10, size=(args.batch_size,), dtype=np.int32)
  batch = jax.block_until_ready(jax.device_put({"image": images, "label": labels}))

  have_torch = False
  if not args.no_torch:
    try:
      import torch  # noqa: F401

      have_torch = True
    except ImportError:
      print("PyTorch not installed (pip install -e '.[bench]'): PyTorch rows skipped")

  print(f"building (batch {args.batch_size}, {args.n_bits} bit planes) ...", flush=True)
  steps = {"csq_jax FP": jax_step("fp", args, batch, "auto"),
           f"csq_jax CSQ ({args.n_bits} bits)": jax_step("csq", args, batch, "auto")}
  if not args.quick:
    steps["csq_jax FP, XLA conv"] = jax_step("fp", args, batch, "xla")
    steps[f"csq_jax CSQ ({args.n_bits} bits), XLA conv"] = jax_step("csq", args, batch, "xla")
  if have_torch:
    steps["PyTorch FP"] = torch_step(None, images, labels, args.torch_threads)
    steps[f"PyTorch CSQ ({args.n_bits} bits)"] = torch_step(args.n_bits, images, labels, args.torch_threads)

  print(f"timing {args.steps} interleaved rounds after {args.warmup} warm-up ...", flush=True)
  times = time_interleaved(steps, args.warmup, args.steps)
  spe = CIFAR10_TRAIN_EXAMPLES // args.batch_size
  threads = f", PyTorch on {args.torch_threads} threads" if have_torch else ""
  print(f"\nResNet-20, batch {args.batch_size}x32x32x3, {jax.devices()[0].platform} ({os.cpu_count()} cores){threads}; "
        f"median of {args.steps} rounds")
  print(f"{'step':40s} {'wall ms':>9s} {'CPU ms':>9s} {'CIFAR-10 epoch':>15s}")
  for k, (w, c) in times.items():
    print(f"{k:40s} {1e3 * w:9.0f} {1e3 * c:9.0f} {w * spe:13.0f} s")

  fp, csq = times["csq_jax FP"][0], times[f"csq_jax CSQ ({args.n_bits} bits)"][0]
  print("\nratios of median wall times:")
  if have_torch:
    tfp = times["PyTorch FP"][0]
    print(f"  csq_jax CSQ / PyTorch FP  = {csq / tfp:.2f}  (target <= 1.0, stretch 0.5)")
    print(f"  csq_jax FP  / PyTorch FP  = {fp / tfp:.2f}")
    print(f"  csq_jax CSQ / PyTorch CSQ = {csq / times[f'PyTorch CSQ ({args.n_bits} bits)'][0]:.2f}")
  print(f"  CSQ / FP within csq_jax   = {csq / fp:.2f}  (target <= 1.1)")
  if not args.quick:
    print(f"  fast conv / XLA conv, FP  = {fp / times['csq_jax FP, XLA conv'][0]:.2f}")
    print(f"  fast conv / XLA conv, CSQ = {csq / times[f'csq_jax CSQ ({args.n_bits} bits), XLA conv'][0]:.2f}")

  job = default_job_epoch(("xla", "auto"), args.warmup, args.steps)
  print(f"\ndefault job ({job['desc']}): wall time per epoch (train steps only)")
  print(f"  XLA conv (CSQ_JAX_CONV=xla): {job['xla']:.2f} s    fast conv (default): {job['auto']:.2f} s")


if __name__ == "__main__":
  main()
