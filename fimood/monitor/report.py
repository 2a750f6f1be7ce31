"""The monitor's report: one self-contained HTML page (plots embedded, works offline) and a JSON summary.

Plots are drawn from the history's summaries, never from score rows, so a year of nights costs the
same few figures: the OOD rate over time with its expected band, a layers × nights heatmap, this
run's p-value histograms over the reference, and thumbnails of the most OOD rows of each shift.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict

import numpy as np
import scipy.stats

from fimood.monitor.result import REFERENCE_DOMINATES, MonitorResult
from fimood.plotting import png_bytes, pyplot
from fimood.storage import join, write_bytes

SUMMARY_SCHEMA_VERSION = 4  # 2: `mean_shift`, `min_mean_shift`; 3: `stream`, `guarantee`, per-partition `guarantee`;
# 4: `still_shifted`
MAX_HEATMAP_LAYERS = 30


def write_monitor_report(result: MonitorResult, url: str, storage_options=None) -> tuple[str, str]:
    """Write `index.html` and `summary.json` under `url`; returns their URLs."""
    page, summary = join(url, "index.html"), join(url, "summary.json")
    write_bytes(summary, json.dumps(summary_document(result), indent=1).encode(), storage_options)
    write_bytes(page, html_page(result).encode(), storage_options)
    return page, summary


def summary_document(result: MonitorResult) -> dict:
    """The JSON a scheduler or dashboard reads: the exit code and each partition's verdict."""
    partitions = []
    for verdict in result.verdicts:
        entry = {"partition": verdict.partition, "verdict": verdict.verdict, "reason": verdict.reason}
        if verdict.tests is not None:
            tests = verdict.tests
            entry |= {
                "rows": verdict.summary.rows,
                "errors": sum(verdict.summary.errors_by_reason.values()),
                "ood_rate": tests.ood_rate,
                "expected_rate": tests.expected_rate,
                "excess_rate_ci": list(tests.excess_rate_ci),
                "excess": tests.excess,
                "mean_shift": tests.mean_shift,
                "largest_layer_shift": tests.largest_layer_shift,
                "p_values": {"rate": tests.rate_p, "rank": tests.rank_p, "layers": tests.layers_p},
                "p_value": tests.p_value,
                "e_value": verdict.e_value,
                "statistic": verdict.statistic,
                "top_layers": tests.top_layers,
                "guarantee": asdict(verdict.guarantee),
            }
        partitions.append(entry)
    return {
        "schema": "fimood-monitor-summary",
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "detector_id": result.detector_id,
        "stream": result.stream,
        "budget": result.budget.describe(),
        "reference_risk": result.reference.risk,
        "guarantee": None if result.guarantee is None else str(result.guarantee),
        "min_excess": result.min_excess,
        "min_mean_shift": result.min_mean_shift,
        "exit_code": result.exit_code,
        "partitions": partitions,
        "still_shifted": [
            {"partition": row["partition"], "monitored_at": row["monitored_at"]} for row in result.still_shifted
        ],
        "unreadable_shards": [{"path": path, "reason": why} for path, why in sorted(result.unreadable.items())],
    }


def html_page(result: MonitorResult) -> str:
    shifts = [v for v in result.verdicts if v.verdict == "shift"]
    head = f"{len(result.shifted)} of {len(result.verdicts) + result.unchanged} partitions shifted"
    head = head if result.shifted else "no shift"
    sections = [
        f"<h1>fimood monitor: {html.escape(head)}</h1>",
        f"<p>Detector <code>{result.detector_id}</code>; {html.escape(result.budget.describe())}; a shift also "
        f"needs at least {result.min_excess:.1%} of a partition's rows beyond the reference, or the layers' mean "
        f"moved by {result.min_mean_shift:g} of an in-distribution standard deviation (both lower bounds). "
        f"Stream <code>{html.escape(result.stream)}</code>, {len(result.history)} partitions in its history.</p>",
        _guarantee_paragraph(result),
        "<h2>Verdicts</h2>",
        _verdict_table(result),
        *[
            f"<p class='shift'>Still shifted: <code>{html.escape(row['partition'])}</code>, found shifted "
            f"{html.escape(row['monitored_at'])} and unchanged since</p>"
            for row in result.still_shifted
        ],
        *[
            f"<p class='fail'>Unreadable shard, left out: <code>{html.escape(path)}</code>: {html.escape(why)}</p>"
            for path, why in sorted(result.unreadable.items())
        ],
        "<h2>OOD rate over time</h2>",
        _image(_rate_plot(result)),
        "<h2>Which layers moved (mean z-shift in standard errors, layers × nights)</h2>",
        _image(_heatmap(result)),
        "<h2>This run's p-values over the reference (flat when nothing moved)</h2>",
        _image(_p_value_histograms(result)),
    ]
    for verdict in shifts:
        if verdict.thumbnails:
            sections += [f"<h2>Most OOD rows of {html.escape(verdict.partition)}</h2>", _thumbnails(verdict)]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.shift{background:#fdd}.fail{background:#fec}"
        "img{max-width:100%}figure{display:inline-block;margin:4px;font-size:11px}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fimood monitor</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>"
    )


def _verdict_table(result: MonitorResult) -> str:
    header = (
        "<tr><th>partition</th><th>verdict</th><th>rows</th><th>errors</th><th>OOD rate</th><th>expected</th>"
        "<th>excess</th><th>mean shift</th><th>p-value</th><th>statistic</th><th>layers that moved</th></tr>"
    )
    rows = []
    for v in result.verdicts:
        css = {"shift": "shift", "could not run": "fail"}.get(v.verdict, "")
        if v.tests is None:
            rows.append(
                f"<tr class='{css}'><td>{html.escape(v.partition)}</td><td colspan=10>{html.escape(v.reason)}</td></tr>"
            )
            continue
        t = v.tests
        rows.append(
            f"<tr class='{css}'><td>{html.escape(v.partition)}</td><td>{v.verdict}</td><td>{v.summary.rows}</td>"
            f"<td>{sum(v.summary.errors_by_reason.values())}</td><td>{t.ood_rate:.2%}</td><td>{t.expected_rate:.2%}</td>"
            f"<td>{t.excess:.2%}</td><td>{t.mean_shift:.2f}</td><td>{t.p_value:.2g}</td><td>{v.statistic:.3g}</td>"
            f"<td>{html.escape(', '.join(t.top_layers))}</td></tr>"
        )
    return f"<table>{header}{''.join(rows)}</table>"


def _guarantee_paragraph(result: MonitorResult) -> str:
    if result.guarantee is None:
        return ""
    text = f"<p><b>Guarantee:</b> {html.escape(str(result.guarantee))}.</p>"
    if result.guarantee.reference_dominates:
        text += f"<p><b>Warning:</b> {html.escape(REFERENCE_DOMINATES)}.</p>"
    return text


def _rate_plot(result: MonitorResult):
    plt = pyplot()
    history = result.history
    reference = result.reference
    figure, axes = plt.subplots(figsize=(10, 3.2))
    x = np.arange(len(history))
    rates = [row["ood_rate"] for row in history]
    low, high = [], []
    j, m = reference.above_threshold, reference.n_calibration
    rates_allowed = scipy.stats.beta.ppf([reference.test_risk, 1 - reference.test_risk], j + 1, m - j)
    for row in history:  # what this reference allows, and a night of this many rows' own 95% noise
        n = max(row["scored"], 1)
        band = scipy.stats.binom.ppf([0.025, 0.975], n, rates_allowed) / n
        low.append(band[0])
        high.append(band[1])
    axes.fill_between(
        x, low, high, color="#9bc", alpha=0.5, label="in distribution, this reference allowed for (95%)", step="mid"
    )
    axes.axhline(reference.expected_rate, color="#468", lw=1)
    colors = ["#c22" if row["verdict"] == "shift" else "#222" for row in history]
    axes.plot(x, rates, color="#222", lw=1)
    axes.scatter(x, rates, c=colors, s=14, zorder=3)
    _night_ticks(axes, history)
    axes.set_ylabel("OOD rate")
    axes.legend(loc="upper left", fontsize=8)
    return figure


def _heatmap(result: MonitorResult):
    plt = pyplot()
    history = result.history
    shifts = np.array([row["layer_shift"] for row in history]).T  # layers × nights
    names = result.reference.layer_names
    picked = np.argsort(-np.abs(shifts).max(axis=1))[:MAX_HEATMAP_LAYERS]
    picked.sort()
    figure, axes = plt.subplots(figsize=(10, 0.22 * len(picked) + 1.6))
    limit = max(4.0, float(np.abs(shifts[picked]).max()))
    image = axes.imshow(shifts[picked], aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    axes.set_yticks(range(len(picked)), [names[i] for i in picked], fontsize=7)
    _night_ticks(axes, history)
    figure.colorbar(image, ax=axes, label="z-shift (s.e.)")
    return figure


def _p_value_histograms(result: MonitorResult, bins: int = 20):
    plt = pyplot()
    tested = [v for v in result.verdicts if v.summary is not None][:12]
    columns = min(4, max(len(tested), 1))
    figure, axes = plt.subplots(
        -(-max(len(tested), 1) // columns),
        columns,
        figsize=(10, 2.2 * -(-max(len(tested), 1) // columns)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, verdict in zip(axes.flat, tested, strict=False):
        counts = verdict.summary.rank_counts
        m = len(counts) - 1
        p_values = (1 + np.arange(m + 1)) / (m + 1)
        density, edges = np.histogram(p_values, bins=bins, range=(0, 1), weights=counts / max(counts.sum(), 1))
        ax.set_visible(True)
        ax.bar(
            edges[:-1],
            density * bins,
            width=1 / bins,
            align="edge",
            color="#c22" if verdict.verdict == "shift" else "#579",
        )
        ax.axhline(1.0, color="#222", lw=1, ls="--")
        ax.set_title(verdict.partition, fontsize=8)
        ax.set_xlabel("p-value", fontsize=7)
    return figure


def _night_ticks(axes, history: list[dict], most: int = 12) -> None:
    step = max(1, -(-len(history) // most))
    axes.set_xticks(
        range(0, len(history), step), [row["partition"] for row in history][::step], rotation=30, fontsize=7, ha="right"
    )


def _image(figure) -> str:
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(png_bytes(figure, 80)).decode()}'>"


def _thumbnails(verdict) -> str:
    from fimood.lake.images import encode_png

    figures = []
    for score, row_id in verdict.most_ood:
        if row_id in verdict.thumbnails:
            data = base64.b64encode(encode_png(verdict.thumbnails[row_id])).decode()
            figures.append(
                f"<figure><img width=84 style='image-rendering:pixelated' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(row_id[-24:])}<br>score {score:.1f}</figcaption></figure>"
            )
    return "".join(figures)
