"""muPC's learning-rate transfer: the best Adam learning rate of a deep residual network, across
widths and depths.

    python benchmarks/run.py deep-transfer [--depths 16,128] [--widths 64,128,256]
        [--lrs 0.003,0.01,0.03] [--max-steps 300] [the options of `deep`] [--data-dir DIR]

Every (depth, width, learning rate) trains `pcjax.nn.ResidualMLP` (muPC) with the inference of
`deep` (`--inference`, `--inference-steps`, `--state-step`, ...) for `--max-steps` batches (the
learning rate cosine-decayed over them with `--cosine`), on the same batches in the same order,
and records the test accuracy at the end. muPC (Innocenti et al. 2025) promises that the best
learning rate does not move with the width or the depth, so that one tuned on a small network
serves a large one; the table shows whether it does here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import harness

from . import deep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    deep.add_arguments(parser)
    parser.set_defaults(depths="16,128", parameterisations="mupc", max_steps=300, batch=64)
    parser.add_argument("--widths", default="64,128,256", help="comma-separated widths")
    parser.add_argument("--lrs", default="0.003,0.01,0.03", help="comma-separated learning rates")


def default_out(args: argparse.Namespace) -> Path:
    return harness.RESULTS / "deep-transfer.json"


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    if args.max_steps is None:
        raise ValueError("deep-transfer: pass --max-steps (each cell is one training run)")
    data = deep.mnist_arrays(args.data_dir)
    config = {k: v for k, v in deep.result_config(args).items() if k not in ("width", "lr")}
    cells = []
    for depth in (int(d) for d in args.depths.split(",")):
        for width in (int(w) for w in args.widths.split(",")):
            for lr in (float(r) for r in args.lrs.split(",")):
                one = argparse.Namespace(**{**vars(args), "width": width, "lr": lr})
                one.checkpoint = None  # short runs: nothing to resume
                result = deep.train(one, depth, True, data)
                cells.append({"depth": depth, "width": width, "lr": lr, **result})
                harness.log(f"depth {depth}, width {width}, lr {lr:g}: {result['final']}")
    return config, {"cells": cells}
