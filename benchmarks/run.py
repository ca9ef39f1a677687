"""One command for every benchmark: `python benchmarks/run.py <experiment> [options]`.

Experiments (`benchmarks/experiments/`; `python benchmarks/run.py <experiment> --help`):

    suite          tasks x algorithms (+ peers): step time, memory, accuracy, time to target
    step           pcjax's PC step vs the hand-written reference (MLP and CNN)
    depth          compile and step time vs depth / sequence length, unrolled vs lax.scan
    dtypes         float32 vs bfloat16 compute vs float64 on the MNIST MLP
    gamma          standard PC -> backprop as the output precision shrinks, every builder
    natgrad        PC + natural gradient vs PC + Adam vs backprop (MNIST MLP)
    architectures  LSTM, ResNet and Transformer trained by PC next to backprop
    train-cnn      the VGG-style CNN trained on MNIST by PC (and backprop)
    deep           16- and 128-layer residual PC networks, muPC vs standard parameterisation
    deep-align     standard PC's learning signal against backprop's, block by block (128 blocks)
    deep-transfer  muPC's learning-rate transfer: the best learning rate across widths and depths
    fast           PC configurations vs backprop on the demo's MLP: step time, time to 98%
    equilibrium-targets  gradient evaluations and time to the equilibrium certificate, per solver

Each writes one JSON file (`--out`, default `benchmarks/results/<experiment>[-quick].json`)
through `harness.py` and prints its table (`report.py`). `benchmarks/sharded_training.py`
stays a script of its own: it sets the simulated device count before JAX starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import report

EXPERIMENTS = {
    "suite": "experiments.suite",
    "step": "experiments.step",
    "depth": "experiments.depth",
    "dtypes": "experiments.dtypes",
    "gamma": "experiments.gamma",
    "natgrad": "experiments.natgrad",
    "architectures": "experiments.architectures",
    "train-cnn": "experiments.train_cnn",
    "deep": "experiments.deep",
    "deep-align": "experiments.deep_align",
    "deep-transfer": "experiments.deep_transfer",
    "fast": "experiments.fast",
    "equilibrium-targets": "experiments.equilibrium_targets",
}


def module(name: str):
    return importlib.import_module(EXPERIMENTS[name])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = top.add_subparsers(dest="experiment", required=True, metavar="experiment")
    for name in EXPERIMENTS:
        mod = module(name)
        doc = mod.__doc__ or name
        p = sub.add_parser(
            name,
            help=doc.splitlines()[0],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.add_argument("--out", help="the JSON file to write (default: results/<experiment>.json)")
    return top


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    mod = module(args.experiment)
    env = harness.environment()
    harness.log(f"{args.experiment}: {harness.describe(env)}")
    start = time.perf_counter()
    config, results = mod.run(args)
    document = harness.result_document(
        args.experiment, config, results, time.perf_counter() - start, env
    )
    path = harness.write_result(args.out or mod.default_out(args), document)
    print(report.render(document))
    harness.log(f"wrote {path} ({document['seconds']:.0f} s)")
    return document


if __name__ == "__main__":
    main()
