"""An evaluation's report: one self-contained ``report.html`` that opens from disk without a server.

Everything is inline -- plots as base64 PNG made with matplotlib (its Agg canvas, no pyplot, so a caller's
backend is left alone), thumbnails as base64 PNG/JPEG, the style sheet and a few lines of plain JavaScript --
and nothing points outside the file (no URL, script or font to fetch).

The sections, each replaced by a short note when its input is ``None`` or empty:

1. the metrics (the numbers the caller writes to ``metrics.json``): each value in an element carrying
   ``data-key`` and ``data-value`` (the exact ``repr``) next to the rounded text, so the page can be checked
   against ``metrics.json``;
2. Recall@K against K (log2 axis), one curve per search (e.g. Euclidean and PDDM re-ranking);
3. positive vs negative pair similarities, one histogram panel per similarity, with their separation: the
   AUC (Mann-Whitney U, ties counted one half) and d' (difference of means over the pooled std);
4. queries with their top-8 retrievals, green border right, red wrong;
5. training curves from a run's ``metrics.jsonl`` (loss, validation Recall@K, lr, spread: whichever exist).

On load the script counts the ``<img>`` elements that decoded (``complete && naturalWidth > 0``) and writes
the figures into ``<p id="status" data-images-total=".." data-images-ok="..">``, so a broken image shows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 8  # retrievals shown per query
THUMB_PX = 64  # longest side of a thumbnail
POSITIVE_COLOUR = "#2e7d32"
NEGATIVE_COLOUR = "#c62828"

__all__ = ["write_report", "pair_auc", "separation"]


# --------------------------------------------------------------------------- numbers


def pair_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive pair scores above a negative pair) + 1/2 P(tie): the Mann-Whitney U statistic over
    ``n_pos * n_neg``, from the average ranks of the pooled scores (numpy only). NaN when either side is empty.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    pooled = np.concatenate([pos, neg])
    uniq, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks it spans are (end - count + 1) .. end.
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum_pos = avg_rank[inverse[: len(pos)]].sum()
    u = rank_sum_pos - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def separation(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
    """AUC (see :func:`pair_auc`), d' = (mean_pos - mean_neg) / sqrt((var_pos + var_neg) / 2), the means and
    the pair counts, over the finite values of each side."""
    pos = _finite(positive)
    neg = _finite(negative)
    out = {"auc": pair_auc(pos, neg), "n_positive": float(len(pos)), "n_negative": float(len(neg))}
    out["mean_positive"] = float(pos.mean()) if len(pos) else float("nan")
    out["mean_negative"] = float(neg.mean()) if len(neg) else float("nan")
    if len(pos) and len(neg):
        pooled_sd = math.sqrt((pos.var() + neg.var()) / 2.0)
        diff = out["mean_positive"] - out["mean_negative"]
        out["d_prime"] = diff / pooled_sd if pooled_sd > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
    else:
        out["d_prime"] = float("nan")
    return out


def _finite(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _exact(v: numbers.Real) -> str:
    """The value as ``metrics.json`` would hold it: ``repr`` of a Python int/float (never ``np.float64(..)``)."""
    return repr(int(v)) if isinstance(v, numbers.Integral) else repr(float(v))


def _rounded(v: numbers.Real) -> str:
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    v = float(v)
    if not math.isfinite(v):
        return repr(v)
    if v.is_integer() and abs(v) < 1e15:
        return f"{int(v):,}"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.3e}"
    return f"{v:.4f}"


def _flatten(metrics: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    """(key, value) in order; a nested mapping's keys joined with ``/`` (``rerank@8/recall@1``)."""
    out = []
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + "/")
        else:
            out.append((key, v))
    return out


# --------------------------------------------------------------------------- images


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _fig_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, role: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img src="{uri}" alt="{html.escape(alt)}" data-role="{role}"{c}>'


def _to_pil(image):
    """A PIL image from a PIL image, or an array HxW / HxWxC / CxHxW (uint8, or float in [0, 1])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    return Image.fromarray(a)


def _thumb_uri(image) -> str:
    """Longest side scaled to ``THUMB_PX``; PNG for grey/palette/alpha images (glyphs), JPEG for photos."""
    from PIL import Image

    im = _to_pil(image)
    if im.mode not in ("L", "RGB", "RGBA", "LA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode in ("P", "PA") else "RGB")
    w, h = im.size
    scale = THUMB_PX / max(w, h, 1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    im = im.resize(size, resample)
    buf = io.BytesIO()
    if im.mode == "RGB":
        im.save(buf, format="JPEG", quality=88)
        mime = "jpeg"
    else:
        im.save(buf, format="PNG", optimize=True)
        mime = "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- sections


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _metrics_section(metrics: Mapping | None) -> str:
    if not metrics:
        return _note("no metrics given")
    rows, other = [], []
    for key, v in _flatten(metrics):
        k = html.escape(key, quote=True)
        if _is_number(v):
            rows.append(
                f'<tr><th scope="row">{k}</th>'
                f'<td class="num" data-key="{k}" data-value="{html.escape(_exact(v), quote=True)}">'
                f"{html.escape(_rounded(v))}</td></tr>"
            )
        else:
            text = json.dumps(v, default=str) if not isinstance(v, str) else v
            other.append(f'<tr><th scope="row">{k}</th><td class="text">{html.escape(text)}</td></tr>')
    parts = []
    if rows:
        parts.append('<table class="metrics">\n<thead><tr><th>metric</th><th>value</th></tr></thead>\n<tbody>')
        parts.append("\n".join(rows))
        parts.append("</tbody></table>")
    else:
        parts.append(_note("no numeric metrics"))
    if other:
        parts.append('<h3>other entries</h3>\n<table class="metrics other"><tbody>')
        parts.append("\n".join(other))
        parts.append("</tbody></table>")
    return "\n".join(parts)


def _recall_section(curves: Mapping[str, Mapping[int, float]] | None) -> str:
    clean = {}
    for name, curve in (curves or {}).items():
        pts = sorted((int(k), float(v)) for k, v in (curve or {}).items() if math.isfinite(float(v)) and int(k) > 0)
        if pts:
            clean[str(name)] = pts
    if not clean:
        return _note("no Recall@K curves given")
    from matplotlib.ticker import FixedLocator, FuncFormatter

    fig, axes = _figure(6.4, 4.0)
    ax = axes[0, 0]
    ks = sorted({k for pts in clean.values() for k, _ in pts})
    for name, pts in clean.items():
        x, y = zip(*pts, strict=True)
        ax.plot(x, y, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlabel("K (log2 scale)")
    ax.set_ylabel("Recall@K")
    lo = min(v for pts in clean.values() for _, v in pts)
    ax.set_ylim(max(0.0, min(lo - 0.05, 0.9)), 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    # The same numbers as a table (the plot's points, exact in data-value).
    head = "".join(f"<th>R@{k}</th>" for k in ks)
    body = []
    for name, pts in clean.items():
        d = dict(pts)
        cells = "".join(
            f'<td class="num" data-recall="{html.escape(repr(d[k]))}">{d[k]:.4f}</td>' if k in d else "<td></td>"
            for k in ks
        )
        body.append(f'<tr><th scope="row">{html.escape(name)}</th>{cells}</tr>')
    table = f'<table class="curve"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return _img(_fig_uri(fig), "Recall@K against K", "plot", "plot") + "\n" + table


def _similarity_section(similarities: Mapping[str, Mapping[str, np.ndarray]] | None) -> str:
    panels = {}
    for name, sides in (similarities or {}).items():
        pos = _finite((sides or {}).get("positive", []))
        neg = _finite((sides or {}).get("negative", []))
        if len(pos) or len(neg):
            panels[str(name)] = (pos, neg, separation(pos, neg))
    if not panels:
        return _note("no pair similarities given")
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(4.2 * ncols, 3.2 * nrows, ncols, nrows)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax, (name, (pos, neg, sep)) in zip(axes.ravel(), panels.items(), strict=False):
        both = np.concatenate([pos, neg])
        lo, hi = float(both.min()), float(both.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
        for vals, label, colour in ((neg, "negative pairs", NEGATIVE_COLOUR), (pos, "positive pairs", POSITIVE_COLOUR)):
            if len(vals):
                ax.hist(vals, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=colour, label=label)
                ax.hist(vals, bins=bins, density=True, histtype="step", color=colour, linewidth=1.2)
        ax.set_title(f"{name}\nAUC {sep['auc']:.3f}   d' {sep['d_prime']:.2f}", fontsize=10)
        ax.set_xlabel("similarity (higher = more alike)")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    rows = []
    for name, (_, _, sep) in panels.items():
        rows.append(
            f'<tr data-similarity="{html.escape(name, quote=True)}"><th scope="row">{html.escape(name)}</th>'
            f'<td class="num" data-auc="{html.escape(repr(sep["auc"]))}">{sep["auc"]:.4f}</td>'
            f'<td class="num">{sep["d_prime"]:.3f}</td>'
            f'<td class="num">{sep["mean_positive"]:.4f}</td><td class="num">{sep["mean_negative"]:.4f}</td>'
            f'<td class="num">{int(sep["n_positive"]):,}</td><td class="num">{int(sep["n_negative"]):,}</td></tr>'
        )
    table = (
        '<table class="separation"><thead><tr><th>similarity</th><th>AUC</th><th>d\'</th><th>mean pos</th>'
        "<th>mean neg</th><th>positive pairs</th><th>negative pairs</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    ranked = sorted(((s["auc"], name) for name, (_, _, s) in panels.items() if math.isfinite(s["auc"])), reverse=True)
    verdict = ""
    if len(ranked) > 1:
        (best_auc, best), (next_auc, nxt) = ranked[0], ranked[1]
        verdict = (
            f'<p class="verdict">Best separation: <b>{html.escape(best)}</b> (AUC {best_auc:.4f}, '
            f"vs {html.escape(nxt)} {next_auc:.4f}).</p>"
        )
    explain = (
        '<p class="explain">AUC = P(a positive pair scores above a negative pair), ties counting one half: the '
        "Mann-Whitney U statistic from the average ranks of the pooled scores, over n<sub>pos</sub>&middot;"
        "n<sub>neg</sub>; 0.5 = no separation, 1 = perfect. d' = (mean<sub>pos</sub> &minus; mean<sub>neg</sub>) / "
        "sqrt((var<sub>pos</sub> + var<sub>neg</sub>) / 2). Non-finite scores are dropped.</p>"
    )
    return "\n".join([_img(_fig_uri(fig), "pair similarity histograms", "plot", "plot"), verdict, table, explain])


def _retrieval_section(retrievals: Sequence[Mapping] | None) -> str:
    if not retrievals:
        return _note("no retrievals given")

    def cell(item: Mapping, cls: str, caption: str) -> str:
        label = str(item.get("label", ""))
        image = item.get("image")
        pic = '<div class="missing">no image</div>' if image is None else _img(_thumb_uri(image), label, "thumb")
        return f'<figure class="{cls}">{pic}<figcaption>{html.escape(label)}{caption}</figcaption></figure>'

    rows = []
    for i, r in enumerate(retrievals):
        neighbours = list(r.get("neighbours") or [])[:TOP_K]
        cells = [cell(r.get("query") or {}, "query", "<br><i>query</i>")]
        for rank, nb in enumerate(neighbours, 1):
            ok = bool(nb.get("correct"))
            d = nb.get("distance")
            dist = f"<br><small>#{rank} d={float(d):.3f}</small>" if _is_number(d) else f"<br><small>#{rank}</small>"
            cells.append(cell(nb, "right" if ok else "wrong", dist))
        n_ok = sum(bool(nb.get("correct")) for nb in neighbours)
        first = next((k for k, nb in enumerate(neighbours, 1) if nb.get("correct")), None)
        summary = f"{n_ok}/{len(neighbours)} right" + (f", first at #{first}" if first else ", none right")
        rows.append(
            f'<div class="row" data-query="{i}"><div class="summary">{html.escape(summary)}</div>{"".join(cells)}</div>'
        )
    legend = (
        '<p class="explain">Each row: the query (blue), then its nearest neighbours in order; green border = same '
        f"class, red = other class (at most {TOP_K} shown).</p>"
    )
    return legend + '\n<div class="grid">\n' + "\n".join(rows) + "\n</div>"


def _read_jsonl(path: Path) -> tuple[dict[int, dict], int]:
    """step -> merged row (a later line for the same step wins: a resumed run repeats steps); bad lines."""
    rows: dict[int, dict] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                step = int(obj["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1  # e.g. the half-written last line of a run that was killed
                continue
            rows.setdefault(step, {}).update(
                {k: float(v) for k, v in obj.items() if k != "step" and _is_number(v) and math.isfinite(v)}
            )
    return rows, bad


def _training_section(training_metrics: str | os.PathLike | None) -> str:
    if training_metrics is None:
        return _note("no training metrics found (no metrics.jsonl given)")
    path = Path(training_metrics)
    if not path.is_file():
        return _note(f"no training metrics found at {path}")
    rows, bad = _read_jsonl(path)
    steps = sorted(rows)

    def series(key: str):
        pts = [(s, rows[s][key]) for s in steps if key in rows[s]]
        return pts if pts else None

    keys = {k for r in rows.values() for k in r}
    val_keys = sorted((k for k in keys if k.startswith("val_recall@")), key=lambda k: int(k.split("@")[1] or 0))
    panels = []  # (title, ylabel, [(label, pts)])
    losses = [(k, series(k)) for k in ("loss", "metric_loss", "embedding_loss") if k in keys]
    if losses:
        panels.append(("training loss", "loss", losses))
    if val_keys:
        panels.append(("validation Recall@K", "recall", [(k.removeprefix("val_"), series(k)) for k in val_keys]))
    if "lr" in keys:
        panels.append(("learning rate", "lr", [("lr", series("lr"))]))
    if "spread" in keys:
        panels.append(("embedding spread (~0 = collapse)", "spread", [("spread", series("spread"))]))
    if not panels:
        return _note(f"no training metrics found in {path} (no loss, val_recall@K, lr or spread)")
    ncols = min(len(panels), 2)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(5.2 * ncols, 3.0 * nrows, ncols, nrows)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, ylabel, lines) in zip(axes.ravel(), panels, strict=False):
        for label, pts in lines:
            x, y = zip(*pts, strict=True)
            style = {"marker": "o", "markersize": 3} if len(pts) < 30 else {}
            ax.plot(x, y, label=label, linewidth=1.8 if label in ("loss", "recall@1") else 1.0, **style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    info = f"{len(steps)} logged steps ({steps[0]}..{steps[-1]}) from {path}"
    if bad:
        info += f"; {bad} unreadable line{'s' if bad != 1 else ''} skipped"
    bits = []
    if "loss" in rows[steps[-1]]:
        bits.append(f"last loss {rows[steps[-1]]['loss']:.4f}")
    if val_keys:
        k = val_keys[0]
        s = max(s for s in steps if k in rows[s])
        bits.append(f"last {k.removeprefix('val_')} {rows[s][k]:.4f} (step {s})")
    info_html = html.escape(info) + (" &mdash; " + html.escape(", ".join(bits)) if bits else "")
    return _img(_fig_uri(fig), "training curves", "plot", "plot") + f'\n<p class="explain">{info_html}</p>'


# --------------------------------------------------------------------------- page

_CSS = (
    """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{margin-bottom:.2em}
nav a{margin-right:1em}
section{margin:2em 0;border-top:1px solid #ddd;padding-top:.5em}
table{border-collapse:collapse;margin:.5em 0}
th,td{padding:2px 10px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:ui-monospace,monospace}
.note{color:#777;font-style:italic}
.explain{color:#555;font-size:.9em;max-width:60em}
.verdict{font-size:1.05em}
img.plot{max-width:100%;height:auto;display:block}
#status{padding:4px 8px;border-radius:4px;background:#eee;display:inline-block}
#status.ok{background:#e8f5e9}
#status.bad{background:#ffebee;color:#b71c1c;font-weight:bold}
.grid .row{display:flex;align-items:flex-start;gap:6px;margin:6px 0}
.grid .summary{width:8em;font-size:.8em;color:#555;padding-top:20px}
.grid figure{margin:0;width:76px;text-align:center;font-size:.7em;word-wrap:break-word}
.grid figure img,.grid .missing{width:64px;height:64px;object-fit:contain;border:4px solid #999;
background:#000;display:block}
.grid .missing{color:#fff;font-size:9px;line-height:64px}
.grid figure.query img,.grid figure.query .missing{border-color:#1565c0}
.grid figure.right img,.grid figure.right .missing{border-color:"""
    + POSITIVE_COLOUR
    + """}
.grid figure.wrong img,.grid figure.wrong .missing{border-color:"""
    + NEGATIVE_COLOUR
    + """}
"""
)

_SCRIPT = """
(function () {
  function check() {
    var imgs = document.getElementsByTagName("img"), ok = 0, broken = [];
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; else broken.push(imgs[i].alt || ("#" + i));
    }
    var s = document.getElementById("status");
    s.setAttribute("data-images-total", String(imgs.length));
    s.setAttribute("data-images-ok", String(ok));
    s.className = ok === imgs.length ? "ok" : "bad";
    s.textContent = ok === imgs.length
      ? "All " + imgs.length + " images loaded."
      : (imgs.length - ok) + " of " + imgs.length + " images did not load: " + broken.join(", ");
  }
  if (document.readyState === "complete") check(); else window.addEventListener("load", check);
})();
"""


def write_report(
    out_dir: str | os.PathLike,
    metrics: dict,
    *,
    recall_curves: dict[str, dict[int, float]] | None,
    similarities: dict[str, dict[str, np.ndarray]] | None,
    retrievals: list[dict] | None,
    training_metrics: str | os.PathLike | None,
    title: str = "distpddm evaluation",
) -> Path:
    """Write ``out_dir/report.html`` (see the module's doc for its sections) and return its path.

    ``metrics``: the numbers of ``metrics.json`` (written by the caller, not here); ``recall_curves``: curve
    name -> {K: recall}; ``similarities``: similarity name -> {"positive": scores, "negative": scores}, higher
    meaning more alike (pass a distance negated); ``retrievals``: [{"query": {"image", "label"},
    "neighbours": [{"image", "label", "correct", "distance"}, ...]}, ...] with images as PIL images or uint8
    arrays; ``training_metrics``: a run's ``metrics.jsonl`` (a missing file gives a note).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        ("metrics", "Metrics", _metrics_section(metrics)),
        ("recall", "Recall@K", _recall_section(recall_curves)),
        ("similarities", "Positive vs negative pair similarities", _similarity_section(similarities)),
        ("retrievals", f"Queries and their top-{TOP_K} retrievals", _retrieval_section(retrievals)),
        ("training", "Training curves", _training_section(training_metrics)),
    ]
    nav = " ".join(f'<a href="#{sid}">{html.escape(name)}</a>' for sid, name, _ in sections)
    t = html.escape(title)
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{t}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{t}</h1>",
            '<p id="status">Image check did not run (JavaScript off?).</p>',
            f"<nav>{nav}</nav>",
            *(_section(sid, name, body) for sid, name, body in sections),
            f"<script>{_SCRIPT}</script>",
            "</body>",
            "</html>",
            "",
        ]
    )
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
