r"""Learning: parameter gradients of the energy at the relaxed states.

At relaxed states the gradient of $F$ with respect to the parameters $\theta_i$ of node
$i$'s prediction is local: $\partial F / \partial \theta_i =
-(\partial \mu_i / \partial \theta_i)^\top P_i e_i$, which for a dense layer
$\mu = W f(x) + b$ is the Hebbian rule $\partial F / \partial W = -P e\, f(x)^\top$.
The training step that applies them is [pcjax.make_train_step][] (`_rules.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from ._checks import check_no_python_floats
from ._energy import Precision, checked_values, node_dicts
from ._harvest import traces_once
from ._models import EnergyModel, as_model

Array = jax.Array


@traces_once
def param_grads(
    fn: Callable[..., Any] | EnergyModel,
    params: Any,
    states: Mapping[str, Array],
    x: Any,
    observed: Mapping[str, Array] | None = None,
    *,
    precision: Precision | None = None,
    **removed: Any,
) -> Any:
    r"""Gradient of the energy with respect to the parameters, at the given (relaxed) states.

    $$\frac{\partial F}{\partial \theta} = -\sum_i
    \Big(\frac{\partial \mu_i}{\partial \theta}\Big)^{\!\top} P_i e_i .$$

    **Arguments:** as [pcjax.energy][]: `fn` is the tagged forward function or an energy
    transformation of it (for [pcjax.fixed_predictions][] the predictions and their
    Jacobians are those of the feedforward pass, the fixed-prediction assumption); `params`,
    the (relaxed) free `states`, the input `x`, the `observed` nodes' values and the
    `precision`.

    **Returns:** the gradients, with the structure of `params` and None at leaves that are not
    floating-point arrays (as `eqx.filter_grad`). The energy is summed over the batch, so are
    these gradients (divide by the batch size for a mean). Works with any pytree of parameters,
    equinox modules included.

    **Raises:** `TypeError` for a Python float in `params` (see [pcjax.make_train_step][]) and for
    the keyword `fixed_predictions=` (removed in pcjax 0.3: pass `pcjax.fixed_predictions(fn)`);
    `ValueError` as [pcjax.energy][].

    **Example** ([setup][examples-setup]): at the feedforward pass only the output layer
    learns, with the gradient of the squared error.

    ```pycon
    >>> start = pc.forward_init(fn, params, x)
    >>> grads = pc.param_grads(fn, params, {"h": start["h"]}, x, {"y": y})
    >>> loss = lambda w2: 0.5 * jnp.sum((y - start["h"] @ w2) ** 2)
    >>> bool(jnp.allclose(grads["w2"], jax.grad(loss)(params["w2"]), atol=1e-6))
    True
    >>> float(jnp.abs(grads["w1"]).max())
    0.0

    ```
    """
    if removed:
        if "fixed_predictions" in removed:
            raise TypeError(
                "pcjax.param_grads: the keyword `fixed_predictions=` was removed in pcjax 0.3; "
                "pass the transformed network instead: pcjax.param_grads(pcjax."
                "fixed_predictions(fn), params, states, x, observed)."
            )
        raise TypeError(
            f"pcjax.param_grads() got unexpected keyword argument(s) {sorted(removed)}."
        )
    check_no_python_floats(params)
    model = as_model(fn, "pcjax.param_grads")
    states, observed = node_dicts(states, observed)
    values, spec = checked_values(model.fn, params, states, x, observed, precision)
    free = {k: v for k, v in values.items() if k not in observed}
    return model.gradients(params, free, observed, x, spec, precision)[1]
