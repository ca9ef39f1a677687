"""pcjax: predictive coding networks in JAX.

Tag the intermediate values of any JAX forward function with `pcjax.node`; pcjax then computes
the network's free energy, relaxes its states and learns its parameters with plain JAX and optax.
"""

from ._energy import energy, prediction_errors
from ._inference import InferInfo, infer
from ._learning import TrainInfo, param_grads, train_step
from ._tagging import forward_init, node

__all__ = [
    "InferInfo",
    "TrainInfo",
    "energy",
    "forward_init",
    "infer",
    "node",
    "param_grads",
    "prediction_errors",
    "train_step",
]

__version__ = "0.1.0"
