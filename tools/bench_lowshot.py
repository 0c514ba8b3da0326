r"""Low-shot solver benchmark: scikit-learn vs on-device JAX L-BFGS on the same objective.

Synthetic Gaussian-cluster features, cyanure preprocessing, lambda = 0.00025 / n; both solvers
run the same number of L-BFGS iterations without early stopping; reported: seconds, seconds per
iteration, objective and relative duality gap reached (`lowshot.benchmark_solvers`). 1% of
ImageNet-1k:

  python tools/bench_lowshot.py --n 12800 --dim 1024 --classes 1000 --iterations 20 --noise 4
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mim_refiner_jax.evaluation import lowshot  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=12800)
  parser.add_argument("--dim", type=int, default=1024)
  parser.add_argument("--classes", type=int, default=1000)
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--noise", type=float, default=2.0,
                      help="cluster noise of the synthetic features (larger: harder problem)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  result = lowshot.benchmark_solvers(args.n, args.dim, args.classes,
                                     iterations=args.iterations, noise=args.noise,
                                     seed=args.seed)
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
