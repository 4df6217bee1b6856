"""report.html: one self-contained page (inline SVG, no scripts) with the fitness over generations and the
per-layer allocation of the winner next to uniform."""

from __future__ import annotations

import html
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tyrsearch.models import LayerShape
from tyrsearch.search.samplers import GENERATION, ITERATION

WIDTH, HEIGHT, PAD = 720, 220, 40


def fitness_curve(study: optuna.Study) -> list[tuple[int, int, float]]:
    """(iteration, generation, best complete fitness so far in the iteration) per generation."""
    best: dict[tuple[int, int], float] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = (t.system_attrs[ITERATION], t.system_attrs[GENERATION])
        best[key] = min(best.get(key, float("inf")), t.value)
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


def write_report(path: Path, *, study: optuna.Study, result: dict, dense: list[LayerShape],
                 uniform: list[LayerShape]) -> None:
    searched = result["layers"]
    attention = [b["num_attention_heads"] / d.q_heads for b, d in zip(searched, dense, strict=True)]
    mlp = [b["intermediate_size"] / d.intermediate for b, d in zip(searched, dense, strict=True)]
    uniform_attention = [u.q_heads / d.q_heads for u, d in zip(uniform, dense, strict=True)]
    uniform_mlp = [u.intermediate / d.intermediate for u, d in zip(uniform, dense, strict=True)]
    rows = "".join(f"<tr><td>{i + 1}</td><td>{it['steps']}</td><td>{it['start_fitness']:.5f}</td>"
                   f"<td>{it['fitness']:.5f}</td></tr>" for i, it in enumerate(result["iterations"]))
    held_out = result.get("held_out")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>tyrsearch report</title>
<style>body{{font-family:sans-serif;max-width:{WIDTH + 40}px;margin:2em auto}}td,th{{padding:2px 10px}}</style></head>
<body><h1>tyrsearch: {html.escape(str(result["model"]))} at {result["target"]:.0%}</h1>
<p>achieved sparsity {result["achieved_sparsity"]:.4f}; decoder parameters {result["decoder_params_before"]:,}
&rarr; {result["decoder_params_after"]:,}; fitness ({result["fitness"]["metric"]}) {result["fitness"]["value"]:.5f}
{f'; held-out ppl {held_out["ppl"]:.2f}' if held_out else ''}</p>
<h2>Fitness over generations</h2>{_line_svg(fitness_curve(study))}
<table><tr><th>iteration</th><th>level step</th><th>start</th><th>winner</th></tr>{rows}</table>
<h2>Per-layer allocation</h2>
{_bars_svg("attention: query heads kept", attention, uniform_attention)}
{_bars_svg("MLP: channels kept", mlp, uniform_mlp)}
</body></html>
"""
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
