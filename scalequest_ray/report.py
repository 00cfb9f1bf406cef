"""A run root as one HTML page that opens offline: the funnel, what each stage held and cost, the
distributions that show whether the filters did their job, exclusion examples and final pairs.

Charts are matplotlib's own SVG, inlined; every text taken from the data goes through jinja2's
autoescape. Large runs stay cheap: distributions read at most SAMPLE_ROWS rows of the columns they
plot per stage (cost.head: the first rows of files spread over the stage), examples stop at the
first few matching rows, and counts come from manifests and funnel.json, never from the data.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Optional

import jinja2
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from markupsafe import Markup

from .columns import REASON
from .cost import INPUT_TOKENS, cost_table, head, manifests, parquet_files, read_json, resolve, write_text
from .config import TRAINING_STAGES, stage_kind

SAMPLE_ROWS = 20_000  # per stage, for a distribution
EXAMPLES = 3          # rows shown per exclusion reason
FINAL_PAIRS = 10
CUT = 300             # characters of a text shown
TEXT_COLUMNS = ("query", "response", "judgement")


def _svg(fig, name: str) -> Markup:
    """The figure as inline SVG: no XML prolog or DTD URL, no namespace URLs (HTML needs none),
    ids prefixed with the chart's name so that several SVGs on one page never share one."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight",
                    metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg[svg.index("<svg"):])
    for attr in ('id="', 'url(#', 'href="#'):
        svg = svg.replace(attr, attr + name + "-")
    return Markup(svg)


def _figure(width: float = 7, height: float = 3.2):
    # The object API, not pyplot: no global figure state, no GUI backend is ever chosen.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _chart(name: str, title: str, svg: Optional[Markup] = None, note: str = "") -> dict:
    return {"name": name, "title": title, "svg": svg, "note": note}


def funnel_chart(rows: list[dict]) -> dict:
    if not rows:
        return _chart("funnel", "Funnel", note="no funnel.json in this run root")
    fig, ax = _figure(8, 0.5 * len(rows) + 1.5)
    labels = [f"{r['stage']} ({r['unit']})" for r in rows]
    ax.barh(labels, [r["kept"] for r in rows], color="#555555", label="kept")  # grey: the reasons take the colour cycle
    left = [r["kept"] for r in rows]
    reasons = sorted({k for r in rows for k in r["dropped_by_reason"]})
    for reason in reasons:
        n = [r["dropped_by_reason"].get(reason, 0) for r in rows]
        ax.barh(labels, n, left=left, label=f"dropped: {reason}")
        left = [a + b for a, b in zip(left, n)]
    ax.invert_yaxis()
    ax.set_xlabel("rows (each stage in its own unit)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _chart("funnel", "Funnel: rows kept and dropped by reason", _svg(fig, "funnel"))


def _kept_and_excluded(root: str, stage: str, columns: list[str]) -> tuple[dict, dict]:
    return (head(root, stage, "data", columns, SAMPLE_ROWS).to_pydict(),
            head(root, stage, "exclusions", columns, SAMPLE_ROWS).to_pydict())


def _hist(groups: dict[str, list[float]], xlabel: str, bins: int = 40):
    groups = {k: v for k, v in groups.items() if v}
    fig, ax = _figure()
    ax.hist(list(groups.values()), bins=bins, stacked=True, label=list(groups))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows (sample)")
    ax.legend(fontsize=8)
    return fig, ax


def question_length_chart(root: str, found: dict) -> dict:
    name, title = "question_length", "Question length in words (questions stage, kept and excluded)"
    if "questions" not in found:
        return _chart(name, title, note="no questions stage in this run root")
    kept, excl = _kept_and_excluded(root, "questions", ["query"])
    words = lambda t: [len((q or "").split()) for q in t.get("query", [])]  # noqa: E731
    if not (kept.get("query") or excl.get("query")):
        return _chart(name, title, note="the questions stage has no query rows")
    fig, _ = _hist({"kept": words(kept), "excluded": words(excl)}, "words")
    return _chart(name, title, _svg(fig, name))


def difficulty_chart(root: str, found: dict) -> dict:
    name, title = "difficulty", "Predicted difficulty (fail rate) and the drop cut-off"
    if "difficulty" not in found:
        return _chart(name, title, note="no difficulty stage in this run root")
    kept, excl = _kept_and_excluded(root, "difficulty", ["difficulty", REASON])
    easy = [d for d, r in zip(excl.get("difficulty", []), excl.get(REASON, [])) if r == "too_easy" and d is not None]
    other = [d for d, r in zip(excl.get("difficulty", []), excl.get(REASON, [])) if r != "too_easy" and d is not None]
    values = [d for d in kept.get("difficulty", []) if d is not None]
    if not (values or easy or other):
        return _chart(name, title, note="the difficulty stage has no scores")
    fig, ax = _hist({"kept": values, "dropped: too_easy": easy, "dropped: other": other}, "predicted fail rate")
    share = (found["difficulty"].get("config") or {}).get("drop_easiest") or 0
    if easy:  # cut-offs are per generator: the highest too_easy score bounds them all
        ax.axvline(max(easy), color="black", linestyle="--", label=f"cut-off (drop_easiest={share})")
        ax.legend(fontsize=8)
    return _chart(name, title, _svg(fig, name), "" if easy else f"no too_easy rows (drop_easiest={share})")


def reward_chart(root: str, found: dict) -> dict:
    name, title = "reward", "Reward of every scored candidate (reward stage)"
    if "reward" not in found:
        return _chart(name, title, note="no reward stage in this run root")
    kept, excl = _kept_and_excluded(root, "reward", ["reward"])
    values = [v for v in kept.get("reward", []) + excl.get("reward", []) if v is not None]
    if not values:
        return _chart(name, title, note="the reward stage has no scores")
    fig, _ = _hist({"candidates": values}, "reward")
    return _chart(name, title, _svg(fig, name))


def selection_charts(root: str, found: dict) -> list[dict]:
    titles = {"agreement": "Share of candidates agreeing with the majority answer (final pairs)",
              "answer_presence": "Final pairs with and without an extracted answer"}
    if "selection" not in found:
        return [_chart(n, t, note="no selection stage in this run root") for n, t in titles.items()]
    rows = head(root, "selection", "data", ["agreement", "answer"], SAMPLE_ROWS).to_pydict()
    out = []
    agreement = [a for a in rows.get("agreement", []) if a is not None]
    if agreement:
        fig, _ = _hist({"final pairs": agreement}, "agreement share", bins=20)
        out.append(_chart("agreement", titles["agreement"], _svg(fig, "agreement")))
    else:
        out.append(_chart("agreement", titles["agreement"], note="no agreement column in the final pairs"))
    if "answer" in rows:
        present = sum(1 for a in rows["answer"] if a)
        fig, ax = _figure(6, 2)
        ax.barh(["with answer", "without answer"], [present, len(rows["answer"]) - present],
                color=["#4c9a6a", "#c0504d"])
        ax.set_xlabel("final pairs (sample)")
        out.append(_chart("answer_presence", titles["answer_presence"], _svg(fig, "answer_presence")))
    else:
        out.append(_chart("answer_presence", titles["answer_presence"], note="no answer column in the final pairs"))
    return out


def _cut(value: Any) -> str:
    if value is None:
        return "(none)"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= CUT else text[:CUT] + "..."


def exclusion_examples(root: str, stage: str, reasons: dict) -> list[dict]:
    """Per reason (most frequent first), its count and the first EXAMPLES rows with it: a scan
    filtered on the reason that stops as soon as it has them."""
    files = parquet_files(root, stage, "exclusions")
    dataset = pads.dataset(files, filesystem=resolve(root)[0], format="parquet") if files else None
    cols = [c for c in TEXT_COLUMNS if dataset is not None and c in dataset.schema.names]
    out = []
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        try:
            rows = dataset.head(EXAMPLES, columns=cols, filter=pc.field(REASON) == reason).to_pylist() if cols else []
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            rows = []  # shards whose schemas do not unify: the page goes without these examples
        out.append({"reason": reason, "count": n, "columns": cols,
                    "rows": [{c: _cut(r.get(c)) for c in cols} for r in rows]})
    return out


def _input_tokens(root: str, stage: str, m: dict) -> str:
    """Prompt tokens of the stage's own requests: exact when every row was read, else the
    sample's mean x the stage's rows."""
    column = INPUT_TOKENS.get(stage_kind(stage))
    if column is None:
        return "-"
    values = [v for sub in ("data", "exclusions")
              for v in head(root, stage, sub, [column], SAMPLE_ROWS).to_pydict().get(column, [])]
    total = m.get("rows", 0) + m.get("excluded_rows", 0)
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(values) >= total:
        return f"{sum(known):,}"
    return f"≈{sum(known) / len(known) * total:,.0f}"


def stage_rows(root: str, found: dict, costs: dict) -> list[dict]:
    rows = []
    for stage, m in found.items():
        c = costs.get(stage, {})
        training = stage_kind(stage) in TRAINING_STAGES
        metrics = m.get("metrics") or {}
        rows.append({
            "stage": stage,
            "rows_in": "-" if training else m["rows_in"] if m.get("rows_in") is not None else
                       m.get("rows", 0) + m.get("excluded_rows", 0),  # (no rows_in: it made its own rows)
            "rows_out": "-" if training else m.get("rows", 0),
            "input_tokens": "-" if training else _input_tokens(root, stage, m),
            "output_tokens": "-" if training else f"{m.get('output_tokens', 0):,}",
            "seconds": f"{float(m.get('seconds') or 0):.1f}",
            "replicas": "; ".join(f"{p}: {r.get('min', 0)}/{r.get('mean', 0)}/{r.get('max', 0)}"
                                  for p, r in c.get("replicas", {}).items()) or "-",
            "cpu_hours": f"{c.get('cpu_hours', 0):.3f}", "gpu_hours": f"{c.get('gpu_hours', 0):.3f}",
            "cost": "-" if c.get("cost") is None else f"${c['cost']:,.2f}",
            "note": f"{metrics.get('steps', '?')} steps, loss {_loss(metrics.get('first_loss'))} -> "
                    f"{_loss(metrics.get('final_loss'))}" if training else "",
        })
    return rows


def _loss(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ScaleQuest run report: {{ root }}</title>
<style>
body{font-family:sans-serif;margin:2em;max-width:80em} table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.25em .5em;font-size:.9em;vertical-align:top} td.n{text-align:right}
figure.chart{margin:1em 0} figure.chart svg{max-width:100%;height:auto} .note{color:#777}
pre{white-space:pre-wrap;margin:0;max-width:50em}
</style></head><body>
<h1>ScaleQuest run report</h1><p>{{ root }}</p>
<h2>Funnel</h2>
{% for c in charts if c.name == "funnel" %}{% include "chart" %}{% endfor %}
<table id="funnel"><tr><th>stage</th><th>unit</th><th>rows in</th><th>kept</th><th>dropped</th>
<th>dropped by reason</th><th>well-formed</th></tr>
{% for r in funnel %}<tr data-stage="{{ r.stage }}" data-rows-in="{{ r.rows_in }}" data-kept="{{ r.kept }}"
 data-dropped="{{ r.dropped }}">
<td>{{ r.stage }}</td><td>{{ r.unit }}</td><td class="n">{{ r.rows_in }}</td><td class="n">{{ r.kept }}</td>
<td class="n">{{ r.dropped }}</td>
<td>{% for k, v in r.dropped_by_reason.items() %}{{ k }}: {{ v }}{% if not loop.last %}, {% endif %}{% endfor %}</td>
<td>{% if r.wellformed %}{{ r.wellformed.get("wellformed", 0) }} of {{ r.wellformed.of }} ({{ "%.2f"|format(r.wellformed.share) }}){% endif %}</td></tr>
{% endfor %}</table>
<h2>Stages</h2>
<p class="note">Replicas per pool: min/mean/max alive. CPU- and GPU-hours: what the stage's actors held
(manifest resources).{% if not priced %} No prices given: no cost.{% endif %}</p>
<table id="stages"><tr><th>stage</th><th>rows in</th><th>rows out</th><th>input tokens</th><th>output tokens</th>
<th>wall s</th><th>replicas</th><th>CPU-h</th><th>GPU-h</th><th>cost</th><th>note</th></tr>
{% for r in stages %}<tr data-stage="{{ r.stage }}"><td>{{ r.stage }}</td><td class="n">{{ r.rows_in }}</td>
<td class="n">{{ r.rows_out }}</td>
<td class="n">{{ r.input_tokens }}</td><td class="n">{{ r.output_tokens }}</td><td class="n">{{ r.seconds }}</td>
<td>{{ r.replicas }}</td>
<td class="n">{{ r.cpu_hours }}</td><td class="n">{{ r.gpu_hours }}</td><td class="n">{{ r.cost }}</td>
<td>{{ r.note }}</td></tr>
{% endfor %}</table>
<h2>Distributions</h2>
<p class="note">From at most {{ sample_rows }} rows per stage.</p>
{% for c in charts if c.name != "funnel" %}{% include "chart" %}{% endfor %}
<h2>Exclusions</h2>
{% for stage, reasons in exclusions.items() %}<h3>{{ stage }}</h3>
{% for e in reasons %}<h4>{{ e.reason }} ({{ e.count }})</h4>
{% if e.rows %}<table class="examples"><tr>{% for c in e.columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in e.rows %}<tr>{% for c in e.columns %}<td><pre>{{ row[c] }}</pre></td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p class="note">no example rows</p>{% endif %}
{% endfor %}{% else %}<p class="note">no stage excluded rows</p>{% endfor %}
<h2>Final pairs (sample)</h2>
{% if pairs %}<table id="pairs"><tr>{% for c in pair_columns %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in pairs %}<tr>{% for c in pair_columns %}<td><pre>{{ row[c] }}</pre>
</td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p class="note">no selection stage in this run root</p>{% endif %}
</body></html>
"""
# A chart without data is a note outside any figure: every figure.chart holds an <svg>.
CHART = """{% if c.svg %}<figure class="chart" data-chart="{{ c.name }}"><figcaption>{{ c.title }}</figcaption>
{{ c.svg }}{% if c.note %}<p class="note">{{ c.note }}</p>{% endif %}</figure>
{% else %}<p class="note" data-skipped-chart="{{ c.name }}">{{ c.title }}: {{ c.note }}</p>
{% endif %}"""


def build_report(root: str, out_dir: Optional[str] = None, prices: Optional[dict] = None, cfg: Any = None) -> str:
    """Write <out_dir or root/report>/index.html (root may be s3://; read and written within
    cost.endpoint(...)) and return its path. `cfg` (optional) names the accelerators of data
    stages for pricing (cost.cost_table)."""
    found = manifests(root)
    funnel = (read_json(root, "funnel.json") or {}).get("stages", [])
    costs = {r["stage"]: r for r in cost_table(root, prices, cfg)}
    charts = [funnel_chart(funnel), question_length_chart(root, found), difficulty_chart(root, found),
              reward_chart(root, found), *selection_charts(root, found)]
    exclusions = {s: exclusion_examples(root, s, m["excluded_by_reason"])
                  for s, m in found.items() if m.get("excluded_by_reason")}
    pair_columns = ["query", "response", "answer", "reward", "agreement"]
    final = head(root, "selection", "data", pair_columns, FINAL_PAIRS) if "selection" in found else None
    pairs = [{c: _cut(r.get(c)) for c in pair_columns} for r in final.to_pylist()] if final is not None else []
    env = jinja2.Environment(autoescape=True, loader=jinja2.DictLoader({"page": TEMPLATE, "chart": CHART}))
    html = env.get_template("page").render(
        root=root, funnel=funnel, charts=charts, stages=stage_rows(root, found, costs), priced=prices is not None,
        sample_rows=SAMPLE_ROWS, exclusions=exclusions, pairs=pairs, pair_columns=pair_columns)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "index.html").write_text(html, encoding="utf-8")
        return str(out / "index.html")
    return write_text(root, "report/index.html", html)
