"""Markdown tables from the benchmark result files, and the README's tables regenerated.

    python benchmarks/report.py                  # rewrite every table of benchmarks/README.md
    python benchmarks/report.py --check          # exit 1 if a table differs from its JSON
    python benchmarks/report.py results/step.json [view]   # print one file's table

In `benchmarks/README.md` every result table sits between

    <!-- report: results/<file>.json [view] -->
    ...generated...
    <!-- /report -->

and is the rendering of that JSON file (a caption with the device, date and load, then the
table); edit the JSON (by rerunning the experiment), never the table.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
MARKER = re.compile(
    r"(<!-- report: (?P<path>\S+)(?: (?P<view>\S+))? -->\n)(?P<body>.*?)(<!-- /report -->)",
    re.DOTALL,
)


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f} ms"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def caption(document: dict[str, Any], extra: str = "") -> str:
    env = document.get("environment", {})
    load = env.get("load_average")
    parts = [
        f"{env.get('device', '?')} ({env.get('backend', '?')}, "
        f"{env.get('device_count', '?')} device(s))",
        env.get("host", "?"),
        f"jax {env.get('jax', '?')}",
        env.get("date", "?"),
    ]
    if load:
        parts.append(f"load average at start {load[0]:.2f}")
    seconds = document.get("seconds")
    if seconds is not None:
        parts.append(f"run time {seconds / 60:.1f} min")
    text = "Device: " + "; ".join(parts) + "."
    return text + (f" {extra}" if extra else "")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# One renderer per experiment


def render_suite(document: dict[str, Any], view: str | None = None) -> str:
    config, results = document["config"], document["results"]
    header = [
        "task",
        "algorithm",
        "test accuracy",
        "step time",
        "x backprop",
        "steps to target",
        "seconds to target",
        "inference steps to equilibrium",
        "step memory (XLA)",
    ]
    eq_max = config.get("equilibrium", {}).get("max_steps", 500)
    rows = []
    for task_name, task in results["tasks"].items():
        for algorithm, timing in task["timing"].items():
            summary = task.get("training", {}).get(algorithm)
            accuracy = to_target = seconds = equilibrium = "-"
            if summary is not None:
                if summary["accuracy_mean"] is not None:
                    accuracy = f"{summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}"
                if summary["diverged"]:
                    accuracy += f" ({summary['diverged']} diverged)"
                reached = f" ({summary['reached_target']}/{summary['seeds']})"
                to_target = _fmt(summary["steps_to_target"], ".0f", "not reached") + reached
                seconds = _fmt(summary["seconds_to_target"], ".1f")
                equilibrium = _fmt(summary["equilibrium_steps"], "d")
                if summary["equilibrium_steps"] is None and algorithm != "backprop":
                    equilibrium = f"> {eq_max}"
            ratio = _fmt(timing.get("x_backprop"), ".2f")
            if "x_reference" in timing:
                ratio += f" ({timing['x_reference']:.3f} x reference"
                if timing.get("flops_x_reference"):
                    ratio += f"; XLA flops {timing['flops_x_reference']:.3f} x"
                ratio += ")"
            rows.append(
                [
                    f"{task_name} (target {task['target']:.2f})",
                    algorithm,
                    accuracy,
                    _ms(timing["step_seconds"]),
                    ratio,
                    to_target,
                    seconds,
                    equilibrium,
                    _mib(timing.get("peak_memory_bytes")),
                ]
            )
    for peer in results.get("peers", []):
        label = f"{peer['name']} {peer.get('version', '')}".strip()
        if not peer.get("valid"):
            state = "invalid" if "energy_check" in peer else "unavailable"
            rows.append([peer["task"], label, f"{state}: {peer.get('error', '?')}", *["-"] * 6])
            continue
        check = peer.get("energy_check")
        verdict = (
            f"energy check: {check['relative_difference']:.1e} rel."
            if check
            else "run before the energy check existed"
        )
        label += f" (own venv, jax {peer.get('jax', peer.get('jax_version', '?'))}; {verdict})"
        rows.append(
            [
                peer["task"],
                label,
                _fmt(peer.get("test_accuracy"), ".4f"),
                _ms(peer["step_seconds"]),
                f"{peer['x_backprop']:.2f} (own backprop: {_ms(peer['backprop_step_seconds'])})",
                "-",
                "-",
                "-",
                "-",
            ]
        )
    extra = f"Mode: {config['mode']}; seeds: {config['seeds']}; timed calls: {config['repeats']}."
    if config.get("note"):
        extra += f" Note: {config['note']}."
    return caption(document, extra) + "\n\n" + table(header, rows)


FLOPS = "XLA flops ratio"
MINIMA = "ratio of minima"


def _calls(config: dict[str, Any], key: str) -> str:
    """The timed calls of the step experiment: a count, or a minimum and a time budget."""
    budget = config.get("budget_seconds")
    if budget is None:
        return str(config[key])
    return f"at least {config[key]} (as many as fill about {budget:g} s per step)"


def render_step(document: dict[str, Any], view: str | None = None) -> str:
    results, config = document["results"], document["config"]
    parts = []
    if view in (None, "mlp") and results.get("mlp"):
        rows = [
            [
                r["network"],
                str(r["batch"]),
                str(r["T"]),
                _ms(r["reference"]["median_s"]),
                _ms(r["pcjax"]["median_s"]),
                f"{r['ratio']:.3f}",
                f"{r['pcjax']['min_s'] / r['reference']['min_s']:.3f}",
                _fmt(r.get("flops_ratio"), ".4f"),
            ]
            for r in results["mlp"]
        ]
        extra = f"Median of {_calls(config, 'repeats_mlp')} interleaved calls each."
        parts.append(
            caption(document, extra)
            + "\n\n"
            + table(
                ["network (tanh)", "batch", "T", "reference", "pcjax", "ratio", MINIMA, FLOPS], rows
            )
        )
    if view in (None, "cnn") and results.get("cnn"):
        rows = []
        for r in results["cnn"]:
            t = r["times"]
            for loop in ("rolled", "unrolled"):
                rows.append(
                    [
                        r["network"],
                        str(r["batch"]),
                        str(r["T"]),
                        loop,
                        _ms(t[f"reference {loop}"]["median_s"]),
                        _ms(t[f"pcjax {loop}"]["median_s"]),
                        f"{r[f'ratio_{loop}']:.3f}",
                        f"{t[f'pcjax {loop}']['min_s'] / t[f'reference {loop}']['min_s']:.3f}",
                        _fmt(r.get(f"flops_ratio_{loop}"), ".4f"),
                    ]
                )
            default = t[f"pcjax {r['default_loop']}"]
            rows.append(
                [
                    r["network"],
                    str(r["batch"]),
                    str(r["T"]),
                    f"pcjax default ({r['default_loop']}) vs rolled reference",
                    _ms(t["reference rolled"]["median_s"]),
                    _ms(default["median_s"]),
                    f"{r['default_vs_rolled_reference']:.3f}",
                    f"{default['min_s'] / t['reference rolled']['min_s']:.3f}",
                    "-",
                ]
            )
        extra = f"Median of {_calls(config, 'repeats_cnn')} interleaved calls each."
        parts.append(
            caption(document, extra)
            + "\n\n"
            + table(
                ["network", "batch", "T", "loop", "reference", "pcjax", "ratio", MINIMA, FLOPS],
                rows,
            )
        )
    return "\n\n".join(parts)


def render_depth(document: dict[str, Any], view: str | None = None) -> str:
    rows = [
        [
            r["model"],
            str(r["size"]),
            r["loop"],
            f"{r['compile_seconds']:.2f}",
            f"{1e3 * r['step']['median_s']:.2f}",
        ]
        for r in document["results"]["rows"]
    ]
    c = document["config"]
    extra = (
        f"Width {c['width']}, batch {c['batch']}, T = {c['T']}; median of {c['repeats']} "
        "interleaved calls (scan and unrolled of each size)."
    )
    header = ["model", "size", "loop", "compile (s)", "step (ms)"]
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_dtypes(document: dict[str, Any], view: str | None = None) -> str:
    results = document["results"]["runs"]
    base = results["float32"]["step"]["median_s"]
    rows = [
        [
            name,
            f"{r['test_accuracy']:.4f}",
            _ms(r["step"]["median_s"]),
            f"{r['step']['median_s'] / base:.2f}",
            str(r["diverged"]),
        ]
        for name, r in results.items()
    ]
    c = document["config"]
    extra = (
        f"MLP 784-{c['hidden']}-{c['hidden']}-10 on {document['results']['data']}, "
        f"{c['steps']} steps ({c['epochs']} epochs at most), batch {c['batch']}, T = {c['T']}; "
        "the steps of the three runs interleaved, medians over all steps."
    )
    header = ["run", "test accuracy", "median step", "x float32", "diverged"]
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_gamma(document: dict[str, Any], view: str | None = None) -> str:
    config, results = document["config"], document["results"]
    limit = config["max_steps"]
    steps = results.get("inference_steps", {})
    rows = []
    for name, errors in results["relative_errors"].items():
        counts = steps.get(name, [None] * len(errors))
        rows.append(
            [name, *(f"{e:.3g}" + ("*" if n == limit else "") for e, n in zip(errors, counts))]
        )
    header = ["architecture", *(f"gamma={g:g}" for g in config["gammas"])]
    extra = (
        f"Inference: gradient descent, step {config['step_size']:g}, until every sample's state "
        f"gradient is below {config['tol']:g} or {limit} steps (*: stopped at the limit)."
    )
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_natgrad(document: dict[str, Any], view: str | None = None) -> str:
    results, config = document["results"], document["config"]
    steps = results["steps"]
    rows = []
    for name, t in steps.items():
        target = results.get("to_target", {}).get(name)
        if target is None:
            reached, seconds, best = "not run", "-", "-"
        elif target["steps"] is None:
            reached, seconds, best = "not reached", "-", f"{target['accuracy']:.4f}"
        else:
            reached = str(target["steps"])
            seconds = f"{target['seconds']:.1f}"
            best = f"(stopped at {target['accuracy']:.4f})"
        rows.append([name, _ms(t["median_s"]), f"{t['x_pc_adam']:.2f}", reached, seconds, best])
    extra = (
        f"MLP 784-{config['hidden']}-{config['hidden']}-10, T = {config['inference_steps']}, "
        f"batch {config['batch']}, on {results['data']}; step times: median of "
        f"{config['repeats']} interleaved calls."
    )
    header = [
        "method",
        "step time",
        "x PC + Adam",
        f"steps to {config['target']:g}",
        f"training seconds to {config['target']:g}",
        f"best test accuracy in {config['epochs']} epochs",
    ]
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_architectures(document: dict[str, Any], view: str | None = None) -> str:
    rows = [
        [name, f"{r['backprop']['final']:.4f}", f"{r['PC']['final']:.4f}"]
        for name, r in document["results"]["tasks"].items()
    ]
    c = document["config"]
    extra = (
        f"Adam {c['lr']:g}, batch {c['batch']}, {c['epochs']} epochs; PC with T = "
        f"{c['inference_steps']}, state step {c['state_step_size']:g}."
    )
    return caption(document, extra) + "\n\n" + table(["task", "backprop", "PC"], rows)


def render_train_cnn(document: dict[str, Any], view: str | None = None) -> str:
    runs = document["results"]["runs"]
    names = list(runs)
    epochs = max(len(r["epochs"]) for r in runs.values())
    rows = []
    for e in range(epochs):
        row = [str(e + 1)]
        for name in names:
            entries = runs[name]["epochs"]
            if e < len(entries):
                row += [f"{entries[e]['test_accuracy']:.4f}", f"{entries[e]['seconds']:.0f}"]
            else:
                row += ["-", "-"]
        rows.append(row)
    header = ["epoch"] + [h for n in names for h in (f"{n} test accuracy", f"{n} seconds")]
    c = document["config"]
    extra = (
        f"VGG conv 32,64 + dense 128, cross-entropy output, T = {c['inference_steps']}, state "
        f"step {c['state_step_size']:g}, AdamW {c['lr']:g} cosine, batch {c['batch']}, on "
        f"{document['results']['data']}."
    )
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_deep(document: dict[str, Any], view: str | None = None) -> str:
    c = document["config"]
    runs = document["results"]["runs"]
    if view == "curve":  # test accuracy every `eval_every` steps, one column per run
        points = sorted({step for r in runs.values() for step, _ in r["curve"]})
        at = {name: dict(r["curve"]) for name, r in runs.items()}
        rows = [
            [str(step)] + [f"{at[name][step]:.4f}" if step in at[name] else "-" for name in runs]
            for step in points
        ]
        return (
            caption(document, "Test accuracy during training.")
            + "\n\n"
            + table(["step", *runs], rows)
        )
    # Recorded since 2026-11-29; backprop has no inference whose energy could rise.
    rose = c["inference"] != "backprop" and any("energy_rose_steps" in r for r in runs.values())
    rows = []
    for name, r in runs.items():
        per_epoch = ", ".join(
            f"{e['test_accuracy']:.4f}" for e in r["epochs"] if "test_accuracy" in e
        )
        seconds = ", ".join(f"{e['seconds']:.0f}" for e in r["epochs"])
        final = "diverged" if r["diverged"] else f"{r['final']:.4f}"
        mark = " (†)" if "reused_from" in r else ""
        rows.append([name + mark, str(r["steps"]), final, per_epoch or "-", seconds])
        if rose:
            rows[-1].append(str(r.get("energy_rose_steps", "-")))
    decay = " (cosine decay)" if c.get("cosine") else ""
    momentum = f" with momentum {c['state_momentum']:g}" if c.get("state_momentum") else ""
    precision = c.get("output_precision", 1.0)
    output = f"output precision {precision:g}, " if precision != 1.0 else ""
    reused = sorted({r["reused_from"] for r in runs.values() if "reused_from" in r})
    resumed = [
        f"{name} after step {', '.join(map(str, r['resumed_at_steps']))}"
        for name, r in runs.items()
        if r.get("resumed_at_steps")
    ]
    if c["inference"] == "backprop":
        learning = "backprop (jax.grad of the output's squared error), "
    else:
        learning = (
            f"{c['inference']} inference, T = {c['inference_steps']}, state step "
            f"{c['state_step']:g}{' / depth' if c.get('step_over_depth') else ''}{momentum}, "
            f"{output}"
        )
    extra = (
        f"nn.{c.get('network', 'ResNet')} width {c['width']} (blocks scanned), "
        f"{learning}Adam "
        f"{c['lr']:g}{decay}, batch "
        f"{c['batch']}, seed {c['seed']}; test accuracy of the feedforward prediction on the "
        "10,000 test images."
        + (f" (†): measured with the same settings in {', '.join(reused)}." if reused else "")
        + (
            f" Resumed from its checkpoint: {'; '.join(resumed)} (the run time is the last"
            " session's; seconds per epoch add up the training time of every session, one"
            " compilation per resume included)."
            if resumed
            else ""
        )
    )
    header = ["run", "steps", "final test accuracy", "test accuracy per epoch", "s per epoch"]
    if rose:
        header.append("steps whose energy rose")
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_deep_transfer(document: dict[str, Any], view: str | None = None) -> str:
    """One row per (depth, width), one column per learning rate: the final test accuracy,
    the row's best in bold."""
    c, cells = document["config"], document["results"]["cells"]
    lrs = sorted({cell["lr"] for cell in cells})
    rows = []
    for depth, width in sorted({(cell["depth"], cell["width"]) for cell in cells}):
        row = {
            cell["lr"]: cell for cell in cells if (cell["depth"], cell["width"]) == (depth, width)
        }
        finals = {lr: r["final"] for lr, r in row.items() if not r["diverged"]}
        best = max(finals, key=finals.get) if finals else None
        text = []
        for lr in lrs:
            if lr not in row:
                text.append("-")
            elif row[lr]["diverged"]:
                text.append("diverged")
            else:
                value = f"{row[lr]['final']:.4f}"
                text.append(f"**{value}**" if lr == best else value)
        rows.append([str(depth), str(width), *text])
    decay = " (cosine decay)" if c.get("cosine") else ""
    over = " / depth" if c.get("step_over_depth") else ""
    extra = (
        f"nn.ResidualMLP (muPC, blocks scanned), {c['inference']} inference, T = "
        f"{c['inference_steps']}, state step {c['state_step']:g}{over}, Adam{decay} for "
        f"{c['max_steps']} steps, batch {c['batch']}, seed {c['seed']}, the same batches for "
        "every cell; test accuracy on the 10,000 test images after training, the best learning "
        "rate of each row in bold."
    )
    return (
        caption(document, extra)
        + "\n\n"
        + table(["depth", "width", *(f"Adam {lr:g}" for lr in lrs)], rows)
    )


def render_deep_align(document: dict[str, Any], view: str | None = None) -> str:
    c, results = document["config"], document["results"]
    net = f"nn.ResidualMLP 784-{c['width']}x{c['depth']}-10 (muPC), batch {c['batch']}"
    if view in ("initial", "trained"):
        rows = []
        for text, r in results[view].items():
            steps, step, momentum = text.split(":")
            rows.append(
                [steps, step, momentum, f"{r['stem']:.2f}", f"{r['blocks_min']:.2f}",
                 f"{r['blocks_median']:.2f}", str(r["aligned_from"]), f"{r['head']:.2f}",
                 f"{r['energy_ratio']:.2f}"]
            )  # fmt: skip
        which = (
            "the initial network and one training batch, output precision 1"
            if view == "initial"
            else f"the network after the PC run with output precision "
            f"{results['trained_output_precision']:g} below, the same batch and precision"
        )
        extra = (
            f"{net}, {which}; cosine between PC's dF/dtheta after T state updates and "
            "backprop's gradient."
        )
        header = ["T", "state step", "momentum", "stem", "blocks: min", "median"]
        header += ["aligned from block", "head", "F after / F before"]
        return caption(document, extra) + "\n\n" + table(header, rows)
    rows = []
    for name, r in results["training"].items():
        for p in r["points"]:
            rows.append(
                [name, str(p["step"]), f"{p['test_accuracy']:.4f}", f"{p['stem']:.2f}",
                 f"{p['blocks_min']:.2f}", f"{p['blocks_median']:.2f}", f"{p['head']:.2f}",
                 "-" if name == "backprop" else f"{p['energy_ratio']:.2f}"]
            )  # fmt: skip
        if r["diverged_at"]:
            rows.append([name, str(r["diverged_at"]), "diverged"] + ["-"] * 5)
    steps, step, momentum = c["train_solver"].split(":")
    extra = (
        f"{net}, Adam {c['lr']:g}, the same batches in the same order; PC: T = {steps} state "
        f"updates of step {step} with momentum {momentum} from the feedforward pass. Cosines "
        "with backprop's gradient on the step's batch."
    )
    header = ["run", "step", "test accuracy", "stem", "blocks: min", "median", "head"]
    header += ["F after / F before"]
    return caption(document, extra) + "\n\n" + table(header, rows)


def render_fast(document: dict[str, Any], view: str | None = None) -> str:
    c, rows = document["config"], []
    for name, r in document["results"]["rows"].items():
        target = r.get("to_target")
        if target is None:
            reached = ["not run"] * 3 + ["-"]
        elif target["steps"] is None:
            reached = ["not reached", "-", "-", f"{target['final']:.4f}"]
        else:
            reached = [
                str(target["steps"]),
                f"{target['seconds']:.1f}",
                f"{r['x_backprop_to_target']:.2f}",
                f"{target['final']:.4f}",
            ]
        rows.append([name, _ms(r["median_s"]), f"{r['x_backprop']:.2f}", *reached])
    extra = (
        f"MLP 784-{c['hidden']}-{c['hidden']}-10 (the demo's), batch {c['batch']}, AdamW "
        f"{c['lr']:g} with a cosine schedule over {c['epochs']} epochs, on "
        f"{document['results']['data']}; test accuracy checked every quarter epoch; step time: "
        f"median of {c['repeats']} interleaved calls."
    )
    target = f"{c['target']:g}"
    header = ["method", "step time", "x backprop", f"steps to {target}"]
    header += [f"seconds to {target}", "x backprop", f"test accuracy after {c['epochs']} epochs"]
    return caption(document, extra) + "\n\n" + table(header, rows)


def _certificate_cell(entry: dict[str, Any]) -> str:
    """What the run at the cap (or at a fixed budget) reports about its equilibrium."""
    text = f"{entry['certificate']:.2g}"
    if entry.get("diverged"):
        text += ", diverged"
    elif entry.get("energy_rose"):
        text += ", energy rose"
    return text


def _gap_cell(row: dict[str, Any]) -> str:
    gap = row.get("learning_gap")
    if gap is None:
        return "-"
    return f"{gap['gap']:.2g} (energy {gap['energy_gap']:+.1g})"


def render_equilibrium_targets(document: dict[str, Any], view: str | None = None) -> str:
    """The target table of issue 28: gradient evaluations and time to the certificate."""
    c, results = document["config"], document["results"]
    goal, target = c["goal"], c["target"]
    rows, meeting, unmet = [], [], []
    any_gap = any(not case["smooth"] for case in results["cases"].values())
    for name, case in results["cases"].items():
        for point, measured in case["points"].items():
            met = []
            for solver, r in measured["rows"].items():
                if r["reached"]:
                    evaluations = str(r["evaluations"])
                    seconds = _ms(r["time"]["median_s"])
                    status = "yes" if r["evaluations"] <= goal else "no"
                    at = "-"
                    if r["evaluations"] <= goal:
                        met.append(solver)
                else:
                    at_cap = r.get("at_cap") or {}
                    # the run at the cap made this many (Backtracking's cap counts iterations)
                    evaluations = f"not reached within {at_cap.get('evaluations', r['cap'])}"
                    seconds, status = "-", "no"
                    at = _certificate_cell(r["at_cap"]) if r.get("at_cap") else "-"
                cells = [name, point, solver, evaluations, seconds, status, at]
                rows.append(cells + ([_gap_cell(r)] if any_gap else []))
            budget = measured["suite_budget"]
            cells = [
                name,
                point,
                f"suite budget: {budget['steps']} steps of the first row",
                str(budget["evaluations"]),
                _ms(budget["time"]["median_s"]),
                "-",
                _certificate_cell(budget),
            ]
            rows.append(cells + ([_gap_cell(budget)] if any_gap else []))
            label = f"{name} ({point})"
            if met:
                meeting.append(f"{label}: {', '.join(met)}")
            else:
                unmet.append(label)
    header = ["case", "point", "solver", f"gradient evaluations to {target:g}", "wall time"]
    header += [f"<= {goal}", "certificate at the cap"]
    if any_gap:
        header.append("learning-signal gap at the budget used")
    cases = "; ".join(f"{k}: {v['description']}" for k, v in results["cases"].items())
    extra = (
        f"Batch {c['batch']} ({results['data']}); cases: {cases}. Certificate: "
        f"`InferInfo.relative_grad_norm` <= {target:g} (every sample's state field at a "
        f"thousandth of its start), from the feedforward states; gradient evaluations as "
        "`InferInfo.evaluations` counts them with a Hessian-vector product counted 2 (a JVP/VJP "
        f"pair); wall time: jitted `pc.infer` at that budget, median of {c['repeats']} calls, "
        "compilation excluded. `trained`: after a few hundred Adam steps of backprop. The "
        "learning-signal gap (non-smooth CNN only) is `pc.equilibrium_gap` against "
        f"`pc.Backtracking({c['reference_steps']}, step_size=1.0)` relaxed further from the "
        "same states (energy: the relative energy gap)."
    )
    for added in c.get("added_rows", []):  # rows measured by a later run of a few solvers
        env = added["environment"]
        extra += (
            f" Rows {', '.join(added['solvers'])} on {', '.join(added['cases'])} only: a later "
            f"run, `{added['command']}` ({env['date']}, load average at start "
            f"{env['load_average'][0]:.2f})."
        )
    summary = (
        f"**Goal: every case within {goal} gradient evaluations.** "
        + ("Rows that meet it: " + "; ".join(meeting) + ". " if meeting else "No row meets it. ")
        + ("No row meets it on: " + ", ".join(unmet) + "." if unmet else "Every case is met.")
    )
    return caption(document, extra) + "\n\n" + table(header, rows) + "\n\n" + summary


RENDERERS: dict[str, Callable[[dict[str, Any], str | None], str]] = {
    "suite": render_suite,
    "step": render_step,
    "depth": render_depth,
    "dtypes": render_dtypes,
    "gamma": render_gamma,
    "natgrad": render_natgrad,
    "architectures": render_architectures,
    "train-cnn": render_train_cnn,
    "deep": render_deep,
    "deep-align": render_deep_align,
    "deep-transfer": render_deep_transfer,
    "fast": render_fast,
    "equilibrium-targets": render_equilibrium_targets,
}


def render(document: dict[str, Any], view: str | None = None) -> str:
    experiment = document.get("experiment")
    if experiment not in RENDERERS:
        raise ValueError(f"no table for experiment {experiment!r} (known: {sorted(RENDERERS)})")
    return RENDERERS[experiment](document, view)


# ---------------------------------------------------------------------------------------------
# The README


def regenerate(text: str, root: Path = HERE) -> str:
    """`text` with every marked table re-rendered from its JSON file (relative to `root`)."""
    import json

    def replace(match: re.Match) -> str:
        document = json.loads((root / match["path"]).read_text())
        return f"{match.group(1)}{render(document, match['view'])}\n{match.group(5)}"

    return MARKER.sub(replace, text)


def sources(text: str) -> list[str]:
    """The JSON files the marked tables of `text` come from."""
    return [m["path"] for m in MARKER.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="render this result file instead")
    parser.add_argument("view", nargs="?", help="a part of it (step: mlp or cnn)")
    parser.add_argument("--check", action="store_true", help="only check the README's tables")
    parser.add_argument("--readme", default=str(README))
    args = parser.parse_args(argv)
    if args.file:
        import json

        print(render(json.loads(Path(args.file).read_text()), args.view))
        return 0
    readme = Path(args.readme)
    old = readme.read_text()
    new = regenerate(old, readme.parent)
    if args.check:
        if new != old:
            print(f"{readme}: tables differ from their JSON; run python benchmarks/report.py")
            return 1
        print(f"{readme}: {len(sources(old))} tables match their JSON files")
        return 0
    if new != old:
        readme.write_text(new)
    print(f"{readme}: regenerated {len(sources(new))} tables ({', '.join(sources(new))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
