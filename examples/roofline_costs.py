"""A cost table from a device model, for a target that is not at hand.

``python -m csq_jax.profile`` measures a table on the device it runs on. For
a target you cannot run on yet (an accelerator whose latency grows with the
weight bits, a bit-serial or weight-streaming design), this writes the table a
simple roofline of it gives: each counted layer at ``b`` bits costs

    launch + N b / 8 / bandwidth + MACs b a_bits / bit_ops_per_ms   (ms)

(weights streamed from memory at ``bandwidth`` bytes/ms, bit operations at
``bit_ops_per_ms``), in the format ``budget.load_cost_table`` reads.

Usage (from the repository root):
  python examples/roofline_costs.py --config=configs/default.py --out=roofline.json
  python -m csq_jax.main --config=configs/default.py --workdir=runs/roofline \\
      --config.budget_weighting=table:roofline.json --config.target_bits=3
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
from flax import traverse_util

from csq_jax import budget, configlib, data, train


def roofline_table(config, launch_ms: float = 0.005, bandwidth: float = 1e6, bit_ops_per_ms: float = 1e9,
                   bits=range(1, 9)) -> dict:
  ds = data.load_dataset(config)
  model = train.create_model(config, ds.num_classes, ds.image_shape)
  x = np.zeros((1, *ds.image_shape), np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  macs = budget.layer_macs(model, variables, x, train=False)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  sizes = {k: int(np.prod(np.shape(flat[k]))) for k in macs}
  a_bits = min(int(config.act_bits), 32)
  layers = {k: {str(b): launch_ms + sizes[k] * b / 8 / bandwidth + macs[k] * b * a_bits / bit_ops_per_ms
                for b in bits} for k in macs}
  return {"unit": "ms", "device": f"roofline: {bandwidth:g} B/ms, {bit_ops_per_ms:g} bit-ops/ms, {launch_ms} ms"
          " per layer", "layers": layers}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/default.py")
  p.add_argument("--out", default="roofline.json")
  args = p.parse_args()
  with open(args.out, "w") as f:
    json.dump(roofline_table(configlib.load(args.config)), f, indent=1)
  print(args.out)


if __name__ == "__main__":
  main()
