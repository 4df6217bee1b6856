"""report.html: one self-contained page (inline SVG, no scripts) with the fitness over generations, the
per-layer allocation of the winner next to uniform and, for several objectives, the Pareto front."""

from __future__ import annotations

import html
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tyrsearch.allocation import Dims
from tyrsearch.atomic import write_text
from tyrsearch.errors import UserError
from tyrsearch.models import LayerShape
from tyrsearch.search import study as schema
from tyrsearch.search.samplers import best_trial, iteration_trials

WIDTH, HEIGHT, PAD = 720, 220, 40


def fitness_curve(study: optuna.Study) -> list[tuple[int, int, float]]:
    """(iteration, generation, best complete fitness so far in the iteration) per generation."""
    best: dict[tuple[int, int], float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if schema.iteration_of(t) is None:  # a healing-aware selection's trial
            continue
        key = (schema.iteration_of(t), schema.generation_of(t))
        best[key] = min(best.get(key, float("inf")), t.values[0])
    curve, running = [], {}
    for iteration, generation in sorted(best):
        running[iteration] = min(running.get(iteration, float("inf")), best[(iteration, generation)])
        curve.append((iteration, generation, running[iteration]))
    return curve


def _line_svg(points: list[tuple[int, int, float]]) -> str:
    if not points:
        return "<p>no complete trials</p>"
    values = [v for _, _, v in points]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = (WIDTH - 2 * PAD) / max(len(points) - 1, 1)
    xy = [(PAD + i * step, HEIGHT - PAD - (v - low) / span * (HEIGHT - 2 * PAD)) for i, (_, _, v) in enumerate(points)]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    marks = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5"><title>iteration {it + 1}, generation {g}: '
                    f'{v:.5f}</title></circle>' for (x, y), (it, g, v) in zip(xy, points, strict=True))
    breaks = "".join(f'<line x1="{xy[i][0]:.1f}" y1="{PAD / 2}" x2="{xy[i][0]:.1f}" y2="{HEIGHT - PAD}" '
                     'stroke="#bbb" stroke-dasharray="3"/>' for i in range(1, len(points))
                     if points[i][0] != points[i - 1][0])
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" font-size="11">{breaks}'
            f'<polyline points="{path}" fill="none" stroke="#2563eb" stroke-width="1.5"/>{marks}'
            f'<text x="{PAD}" y="{PAD / 2}">{high:.4f}</text><text x="{PAD}" y="{HEIGHT - PAD + 14}">{low:.4f}</text>'
            f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" text-anchor="end">generations (dashed: next iteration)</text>'
            "</svg>")


def pareto_front(study: optuna.Study, objectives: tuple[str, ...] | list[str]) -> list[dict]:
    """The study's Pareto-optimal trials (quality vs cost), cheapest first."""
    front = sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))
    return [{"trial": t.number, "iteration": schema.iteration_of(t), objectives[0]: t.values[0],
             objectives[1]: t.values[1], "sparsity": t.user_attrs["sparsity"],
             "within_budget": t.user_attrs.get("within_budget", True)} for t in front]


def _front_svg(study: optuna.Study, front: list[dict], names: list[str]) -> str:
    """Every complete trial as (cost, quality), the Pareto front joined; hover shows the trial."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    points = [(t.values[1], t.values[0], t.number) for t in complete]
    xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        return (PAD + (x - x0) / ((x1 - x0) or 1) * (WIDTH - 2 * PAD),
                HEIGHT - PAD - (y - y0) / ((y1 - y0) or 1) * (HEIGHT - 2 * PAD))

    on_front = {row["trial"] for row in front}
    dots = "".join(f'<circle cx="{at(x, y)[0]:.1f}" cy="{at(x, y)[1]:.1f}" r="{3 if n in on_front else 2}" '
                   f'fill="{"#dc2626" if n in on_front else "#94a3b8"}"><title>trial {n}: {names[0]} {y:.5f}, '
                   f'{names[1]} {x:.4g}</title></circle>' for x, y, n in points)
    line = " ".join(f"{at(r[names[1]], r[names[0]])[0]:.1f},{at(r[names[1]], r[names[0]])[1]:.1f}" for r in front)
    return (f'<svg width="{WIDTH}" height="{HEIGHT}" font-size="11"><polyline points="{line}" fill="none" '
            f'stroke="#dc2626"/>{dots}<text x="{PAD}" y="{PAD / 2}">{names[0]} {y1:.4f}</text>'
            f'<text x="{PAD}" y="{HEIGHT - PAD + 14}">{y0:.4f}</text><text x="{WIDTH - PAD}" y="{HEIGHT - 8}" '
            f'text-anchor="end">{names[1]} {x0:.4g} .. {x1:.4g} (red: Pareto front)</text></svg>')


def _bars_svg(title: str, searched: list[float], uniform: list[float]) -> str:
    """Kept fraction per layer: searched (filled) next to uniform (outline)."""
    n = len(searched)
    slot = (WIDTH - 2 * PAD) / n
    bars = []
    for i, (s, u) in enumerate(zip(searched, uniform, strict=True)):
        x = PAD + i * slot
        for offset, value, style in ((0.1, s, 'fill="#2563eb"'), (0.5, u, 'fill="none" stroke="#f97316"')):
            h = value * (HEIGHT - 2 * PAD)
            bars.append(f'<rect x="{x + offset * slot:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{0.4 * slot:.1f}" '
                        f'height="{h:.1f}" {style}><title>layer {i}: {value:.2f}</title></rect>')
        bars.append(f'<text x="{x + slot / 2:.1f}" y="{HEIGHT - PAD + 12}" text-anchor="middle">{i}</text>')
    return (f'<h3>{html.escape(title)}</h3><svg width="{WIDTH}" height="{HEIGHT}" font-size="9">{"".join(bars)}'
            f'<text x="{PAD}" y="14" font-size="11">kept fraction per layer: searched (blue), uniform (orange)</text>'
            "</svg>")


def render_report(*, study: optuna.Study, result: dict, dense: list[LayerShape], uniform: list[LayerShape]) -> str:
    searched = result["layers"]
    attention = [b["num_attention_heads"] / d.q_heads for b, d in zip(searched, dense, strict=True)]
    mlp = [b["intermediate_size"] / d.intermediate for b, d in zip(searched, dense, strict=True)]
    uniform_attention = [u.q_heads / d.q_heads for u, d in zip(uniform, dense, strict=True)]
    uniform_mlp = [u.intermediate / d.intermediate for u, d in zip(uniform, dense, strict=True)]
    rows = "".join(f"<tr><td>{i + 1}</td><td>{it['steps']}</td><td>{it['start_fitness']:.5f}</td>"
                   f"<td>{it['fitness']:.5f}</td></tr>" for i, it in enumerate(result["iterations"]))
    held_out = result.get("held_out")
    front = result.get("pareto_front")
    pareto = ""
    if front:
        names = result["config"]["objectives"]
        cells = "".join(f"<tr><td>{r['trial']}</td><td>{r['iteration'] + 1}</td><td>{r[names[0]]:.5f}</td>"
                        f"<td>{r[names[1]]:.4g}</td><td>{r['sparsity']:.3f}</td>"
                        f"<td>{'yes' if r['within_budget'] else 'no'}</td></tr>" for r in front)
        pareto = (f"<h2>Pareto front: {names[0]} vs {names[1]}</h2>{_front_svg(study, front, names)}"
                  f"<table><tr><th>trial</th><th>iteration</th><th>{names[0]}</th><th>{names[1]}</th>"
                  f"<th>sparsity</th><th>within budget</th></tr>{cells}</table>")
    budget = result.get("budget", {}).get("name", "params")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tyrsearch report</title>
<style>body{{font-family:sans-serif;max-width:{WIDTH + 40}px;margin:2em auto}}td,th{{padding:2px 10px}}</style></head>
<body><h1>tyrsearch: {html.escape(str(result["model"]))}, {result["target"]:.0%} of {budget} removed</h1>
{"<p><b>The search is still running: the best candidate so far.</b></p>" if result.get("running") else ""}
<p>achieved sparsity {result["achieved_sparsity"]:.4f}; decoder parameters {result["decoder_params_before"]:,}
&rarr; {result["decoder_params_after"]:,}; fitness ({result["fitness"]["metric"]}) {result["fitness"]["value"]:.5f}
{'; held-out ppl ' + ', '.join(f'{html.escape(n)} {r["ppl"]:.2f}' for n, r in held_out.items()) if held_out else ''}</p>
<h2>Fitness over generations</h2>{_line_svg(fitness_curve(study))}
<table><tr><th>iteration</th><th>level step</th><th>start</th><th>winner</th></tr>{rows}</table>
{pareto}
<h2>Per-layer allocation</h2>
{_bars_svg("attention: query heads kept", attention, uniform_attention)}
{_bars_svg("MLP: channels kept", mlp, uniform_mlp)}
</body></html>
"""
    return page


def write_report(path: Path, *, study: optuna.Study, result: dict, dense: list[LayerShape],
                 uniform: list[LayerShape]) -> None:
    write_text(path, render_report(study=study, result=result, dense=dense, uniform=uniform))


def study_result(study: optuna.Study, *, model: str, dense: list[LayerShape], dims: Dims) -> dict:
    """What a finished search's result.json says, read from its study alone: the search's own result once
    it has finished, else the best candidate so far."""
    if schema.result(study) is not None:
        return schema.result(study)
    settings, iterations = schema.settings(study), []
    best = None
    for k in range(settings["space"]["iterations"]):
        record = schema.iteration_record(study, k)
        trials = iteration_trials(study, k)
        winner = best_trial(trials)
        if record is None or winner is None:
            break
        scores = record.validation
        if scores:  # the iteration has ended: its winner is the best on the held-back tokens
            number = min(scores, key=lambda n: (scores[n], int(n)))
            winner = next(t for t in trials if t.number == int(number))
        start = next((t.values[0] for t in trials if schema.generation_of(t) == 0 and t.values), math.nan)
        iterations.append({"iteration": k, "steps": record.steps, "start_fitness": start,
                           "fitness": winner.values[0]})
        best = winner
    if best is None:
        raise UserError(f"study {study.study_name!r} has no complete candidate yet: try again once a generation ends")
    objectives = settings.get("objectives", ["kl"])
    return {
        "model": model, "target": settings["target"], "achieved_sparsity": best.user_attrs["sparsity"],
        "budget": {"name": settings.get("budget", "params")}, "config": {"objectives": objectives},
        **({"pareto_front": pareto_front(study, objectives)} if len(objectives) > 1 else {}),
        "decoder_params_before": sum(map(dims.params, dense)), "decoder_params_after": best.user_attrs["params"],
        "fitness": {"metric": settings["space"]["fitness"]["metric"], "value": best.values[0]},
        "layers": [{"num_attention_heads": q, "num_key_value_heads": kv, "intermediate_size": mlp}
                   for q, kv, mlp in best.user_attrs["keeps"]],
        "iterations": iterations, "running": True,
    }


def study_report(storage: optuna.storages.BaseStorage, study_name: str) -> str:
    """The report page of a search's study, finished or running (`tyrsearch report`)."""
    from tyrsearch import assets
    from tyrsearch.models import adapter_for
    from tyrsearch.pruner import dims_of
    from tyrsearch.search.driver import uniform_centre
    from tyrsearch.search.job import Job
    from tyrsearch.search.storage import load_study

    study = load_study(storage, study_name)
    if schema.job(study) is None:
        raise UserError(f"study {study_name!r} is not a tyrsearch search; give the --study of a search")
    job = Job(**schema.job(study))
    model, _ = assets.load_model(job.model)
    dense, dims = adapter_for(model).shapes(model), dims_of(model)
    result = study_result(study, model=job.model, dense=dense, dims=dims)
    return render_report(study=study, result=result, dense=dense,
                         uniform=uniform_centre(dense, dims, result["achieved_sparsity"]))
