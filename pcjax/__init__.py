"""pcjax: predictive coding networks in JAX.

Tag the intermediate values of any JAX forward function with `pcjax.node`; pcjax then computes
the network's free energy, relaxes its states and learns its parameters with plain JAX and optax.
"""

from . import nn
from ._backtracking import Backtracking
from ._certificate import EquilibriumGap, equilibrium_gap
from ._checkpoint import checkpoint_metadata, load_checkpoint, save_checkpoint
from ._energy import cross_entropy
from ._inference import infer
from ._langevin import LangevinState, langevin
from ._learning import param_grads
from ._least_squares import GaussNewton, LevenbergMarquardt
from ._models import (
    Context,
    bidirectional,
    energy,
    error_parameterised,
    fixed_predictions,
    forward_init,
    preconditioned,
    prediction_errors,
)
from ._natural import (
    FisherOperator,
    KroneckerFactors,
    NaturalGradientState,
    fisher_mask,
    fisher_statistics,
    natural_gradient,
    precision_weighted_gradient,
)
from ._precision import (
    DiagonalPrecision,
    FullPrecision,
    Precision,
    ScalarPrecision,
    error_moments,
    update_precision_ema,
    update_precision_natural,
)
from ._presets import preset
from ._rules import (
    Amortised,
    Equilibrium,
    Incremental,
    Nudged,
    TrainInfo,
    guarded,
    make_train_step,
)
from ._sharding import cross_device_mean, data_mesh, replicate, shard_batch
from ._solvers import ODE, ConjugateGradient, GradientDescent, InferInfo
from ._tagging import dense, mixed_precision, node

__all__ = [
    "ODE",
    "Amortised",
    "Backtracking",
    "ConjugateGradient",
    "Context",
    "DiagonalPrecision",
    "Equilibrium",
    "EquilibriumGap",
    "FisherOperator",
    "FullPrecision",
    "GaussNewton",
    "GradientDescent",
    "Incremental",
    "InferInfo",
    "KroneckerFactors",
    "LangevinState",
    "LevenbergMarquardt",
    "NaturalGradientState",
    "Nudged",
    "Precision",
    "ScalarPrecision",
    "TrainInfo",
    "bidirectional",
    "checkpoint_metadata",
    "cross_device_mean",
    "cross_entropy",
    "data_mesh",
    "dense",
    "energy",
    "equilibrium_gap",
    "error_moments",
    "error_parameterised",
    "fisher_mask",
    "fisher_statistics",
    "fixed_predictions",
    "forward_init",
    "guarded",
    "infer",
    "langevin",
    "load_checkpoint",
    "make_train_step",
    "mixed_precision",
    "natural_gradient",
    "nn",
    "node",
    "param_grads",
    "precision_weighted_gradient",
    "preconditioned",
    "prediction_errors",
    "preset",
    "replicate",
    "save_checkpoint",
    "shard_batch",
    "update_precision_ema",
    "update_precision_natural",
]

__version__ = "0.3.0"

#: Names removed in pcjax 0.3 (deprecated in 0.2) -> what replaces them.
_REMOVED = {
    "train_step": (
        "build the step once with step = pcjax.make_train_step(fn, pcjax.Equilibrium("
        "pcjax.GradientDescent(steps)), optimizer), then call step(params, opt_state, x, "
        "observed)"
    ),
}


def __getattr__(name: str) -> object:
    """Module attribute look-up of a name pcjax does not have: an `AttributeError` that names
    the replacement of those removed in pcjax 0.3."""
    if name in _REMOVED:
        raise AttributeError(
            f"pcjax.{name} was removed in pcjax 0.3 (deprecated since 0.2): {_REMOVED[name]} "
            "(see the 0.3.0 entry of the changelog)."
        )
    raise AttributeError(f"module 'pcjax' has no attribute {name!r}")
