"""The evaluation report: a fast check of its notes, escaping and numbers, and the page opened in a real
headless browser (Debian's chromium, installed here once per session when missing and run as root)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from distpddm.report import TOP_K, pair_auc, separation, write_report
from tests import fixtures

APT = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium"  # = `make chromium`


# --------------------------------------------------------------------------- the page, parsed


class Page(HTMLParser):
    """The parts of a (dumped) report the tests look at."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.imgs: list[dict] = []
        self.keyed: list[tuple[str, str | None]] = []  # (data-key, data-value)
        self.sections: list[str] = []
        self.status: dict | None = None
        self.scripts: list[dict] = []
        self.links: list[dict] = []
        self.notes: list[str] = []
        self.figcaptions: list[str] = []
        self._in: str | None = None
        self._buf: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if "data-key" in a:
            self.keyed.append((a["data-key"], a.get("data-value")))
        if tag == "section":
            self.sections.append(a.get("id"))
        if a.get("id") == "status":
            self.status = a
        if tag == "script":
            self.scripts.append(a)
        if tag in ("link", "iframe", "object", "embed", "source", "video", "audio"):
            self.links.append(a)
        if (tag == "p" and a.get("class") == "note") or tag == "figcaption":
            self._in, self._buf = tag, []

    def handle_data(self, data):
        if self._in:
            self._buf.append(data)

    def handle_endtag(self, tag):
        if self._in == tag:
            (self.notes if tag == "p" else self.figcaptions).append("".join(self._buf))
            self._in = None


def page_of(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def assert_self_contained(raw: str, page: Page) -> None:
    for img in page.imgs:
        assert img["src"].startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), img["src"][:60]
    assert not page.links, page.links
    assert all("src" not in s for s in page.scripts), page.scripts
    for needle in ("http:", "https:", "//cdn", "url(", "@import", "@font-face"):
        assert needle not in raw, f"{needle!r} in the page: it must need nothing from outside"


# --------------------------------------------------------------------------- inputs


def synthetic_similarities(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "PDDM score": {"positive": rng.normal(1.6, 1.0, 3000), "negative": rng.normal(-0.4, 1.0, 12000)},
        "negative Euclidean distance": {
            "positive": -np.abs(rng.normal(0.7, 0.25, 3000)),
            "negative": -np.abs(rng.normal(1.0, 0.25, 12000)),
        },
    }


def example_metrics() -> dict:
    """Shaped like an evaluation's metrics.json: recalls, other scores, counts and settings."""
    recalls = (0.6030311457174639, 2 / 3, 0.7551446, 0.8, 0.9, 1.0)
    m = {f"recall@{k}": v for k, v in zip((1, 2, 4, 8, 16, 32), recalls, strict=True)}
    m |= {
        "r_precision": 0.41234567890123456,
        "map@r": 0.3141592653589793,
        "nmi": 0.1 + 0.2,  # 0.30000000000000004: only an exact repr round-trips it
        "ncm_top1": 0.55,
        "knn_top5": 0.7125,
        "rerank@8/recall@1": 0.6612903225806451,
        "recall@1_ci95": 1.2345678e-05,
        "nan_if_no_pairs": float("nan"),
        "queries": 14384,
        "val_images": 14384.0,
        "classes": 98,
        "embedding_dim": 128,
        "metric": "euclidean",  # a setting that is no number: shown, not keyed
        "normalize": True,
    }
    return m


def write_jsonl(path: Path, steps: int = 60) -> Path:
    lines = []
    for s in range(0, steps + 1, 5):
        row = {"step": s, "loss": 0.5 * math.exp(-s / 30) + 0.05, "lr": 1e-3 * (1 - s / (steps + 1)), "spread": 0.2}
        if s % 20 == 0:
            row |= {"val_recall@1": 0.5 + s / 200, "val_recall@2": 0.6 + s / 200, "val_images": 100.0}
        lines.append(json.dumps(row))
    lines.append('{"step": 65, "loss": 0.0')  # the half-written line of a killed run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def glyph_retrievals(cache: Path) -> list[dict]:
    """Query glyphs with neighbours from their own font (right) and others (wrong); a 10-neighbour row shows
    that only TOP_K are drawn."""
    images = fixtures.glyph_images(4, 12, cache)
    rng = np.random.default_rng(1)
    rows = []
    for q, n_nb in ((0, 8), (1, 10), (2, 5)):
        nbs = []
        for r in range(n_nb):
            c = q if rng.random() < 0.6 else int((q + 1 + rng.integers(3)) % 4)
            nbs.append(
                {
                    "image": images[c][1 + r],
                    "label": f"font {c}",
                    "correct": c == q,
                    "distance": 0.1 + 0.05 * r,
                }
            )
        rows.append({"query": {"image": images[q][0], "label": f"font {q}"}, "neighbours": nbs})
    return rows


def photo_retrieval() -> dict:
    """One row of RGB photo crops (JPEG thumbnails, PIL images and arrays) with HTML in a label."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    china = load_sample_image("china.jpg")  # 427 x 640 x 3 uint8, bundled with scikit-learn
    crops = [china[40 * i : 40 * i + 120, 50 * i : 50 * i + 180] for i in range(6)]
    return {
        "query": {"image": Image.fromarray(china), "label": "china <b>&amp; co</b>"},
        "neighbours": [
            {"image": Image.fromarray(c) if i % 2 else c, "label": f"crop {i}", "correct": i < 3, "distance": i / 7}
            for i, c in enumerate(crops)
        ],
    }


# --------------------------------------------------------------------------- fast checks (no browser)


def test_missing_inputs_give_notes(tmp_path):
    out = write_report(
        tmp_path,
        {},
        recall_curves=None,
        similarities=None,
        retrievals=None,
        training_metrics=None,
    )
    assert out == tmp_path / "report.html"
    page = page_of(out)
    assert page.sections == ["metrics", "recall", "similarities", "retrievals", "training"]
    assert page.imgs == [] and page.keyed == []
    notes = " | ".join(page.notes)
    for text in ("no metrics given", "no Recall@K curves", "no pair similarities", "no retrievals", "no training"):
        assert text in notes, notes
    assert "no training metrics found" in notes
    assert not (tmp_path / "metrics.json").exists()  # the caller's file: never written here

    # Empty inputs and a metrics.jsonl that is not there are notes too.
    missing = tmp_path / "run" / "metrics.jsonl"
    page = page_of(
        write_report(
            tmp_path,
            {"recall@1": 0.5},
            recall_curves={},
            similarities={"PDDM score": {"positive": np.array([]), "negative": np.array([])}},
            retrievals=[],
            training_metrics=missing,
        )
    )
    assert page.imgs == []
    assert any(n.startswith("no training metrics found") and str(missing) in n for n in page.notes), page.notes
    assert page.keyed == [("recall@1", "0.5")]


def test_labels_and_keys_are_escaped(tmp_path):
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    img = np.zeros((32, 32), np.uint8)
    out = write_report(
        tmp_path,
        {evil: 0.25, 'k"ey': np.float64(0.1) + np.float64(0.2), "n": np.int64(7), "nested": {"a<b": 1.5}},
        recall_curves={evil: {1: 0.5, 2: 0.75}},
        similarities={evil: {"positive": np.array([1.0, 2.0]), "negative": np.array([0.0, 1.0])}},
        retrievals=[
            {"query": {"image": img, "label": evil}, "neighbours": [{"image": img, "label": evil, "correct": True}]}
        ],
        training_metrics=None,
        title=f"title {evil}",
    )
    raw = out.read_text()
    assert "<script>alert" not in raw and "<img src=x" not in raw
    assert raw.count("<script>") == 1  # the page's own check, nothing from a label
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img" in raw
    page = Page(raw)
    assert len(page.imgs) == 2 + 2  # recall plot, similarity plot, query and neighbour
    assert set(page.figcaptions) >= {evil + "query", evil + "#1"}  # the label comes back intact once parsed
    # Numbers as a Python float/int repr (not np.float64(...)); a nested key joined with "/".
    assert dict(page.keyed) == {evil: "0.25", 'k"ey': "0.30000000000000004", "n": "7", "nested/a<b": "1.5"}
    assert_self_contained(raw, page)


def test_pair_auc_is_the_pairwise_probability_with_ties_half():
    rng = np.random.default_rng(3)
    for _ in range(5):
        pos, neg = rng.integers(0, 6, 23).astype(float), rng.integers(0, 6, 31).astype(float)
        brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)])
        assert pair_auc(pos, neg) == pytest.approx(brute, abs=1e-12)
    assert pair_auc([2.0, 3.0], [0.0, 1.0]) == 1.0 and pair_auc([0.0], [1.0]) == 0.0
    assert math.isnan(pair_auc([], [1.0]))
    s = separation(np.array([1.0, 3.0, np.nan]), np.array([0.0, 2.0, np.inf]))
    assert s["auc"] == 0.75 and s["n_positive"] == 2 and s["d_prime"] == pytest.approx(1.0)


def test_training_curves_read_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "metrics.jsonl")
    raw = write_report(
        tmp_path, {}, recall_curves=None, similarities=None, retrievals=None, training_metrics=jsonl
    ).read_text()
    page = Page(raw)
    assert [i["alt"] for i in page.imgs] == ["training curves"]
    assert "13 logged steps (0..60)" in raw and "1 unreadable line skipped" in raw
    assert "last recall@1 0.8000 (step 60)" in raw
    # A file without any of the plotted keys: a note, no empty figure.
    other = tmp_path / "other.jsonl"
    other.write_text('{"step": 1, "images_per_s": 5.0}\n')
    page = page_of(
        write_report(tmp_path, {}, recall_curves=None, similarities=None, retrievals=None, training_metrics=other)
    )
    assert page.imgs == [] and any("no training metrics found in" in n for n in page.notes)


# --------------------------------------------------------------------------- the page in a real browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary; installed with apt-get (as `make chromium` does) when missing and run as root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"chromium is not installed and installing it needs root: run `make chromium` ({APT})")
    try:
        r = subprocess.run(["bash", "-c", APT], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not install chromium ({APT}): {e}")
    found = shutil.which("chromium")
    if r.returncode != 0 or not found:
        pytest.skip(f"could not install chromium ({APT}): exit {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
    return found


def dump_dom(chromium: str, page: Path, profile: Path) -> str:
    """The DOM after the page's scripts ran; no network (a local file, everything that phones home off)."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "</html>" in r.stdout, f"chromium exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def test_report_in_headless_chromium(tmp_path, chromium):
    t0 = time.perf_counter()
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    # The caller writes metrics.json; the report must show exactly its numbers.
    (out_dir / "metrics.json").write_text(json.dumps(example_metrics(), indent=2))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    retrievals = glyph_retrievals(tmp_path / "glyph-cache") + [photo_retrieval()]
    curves = {
        "euclidean": {k: metrics[f"recall@{k}"] for k in (1, 2, 4, 8, 16, 32)},
        "rerank@8 (PDDM)": {1: metrics["rerank@8/recall@1"], 2: 0.74, 4: 0.8, 8: 0.83},
    }
    path = write_report(
        out_dir,
        metrics,
        recall_curves=curves,
        similarities=synthetic_similarities(),
        retrievals=retrievals,
        training_metrics=write_jsonl(tmp_path / "run" / "metrics.jsonl"),
        title="fonts <held-out> & co",
    )
    t_write = time.perf_counter() - t0
    raw = path.read_text(encoding="utf-8")
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(example_metrics()))
    before = Page(raw)
    assert before.status is not None and "data-images-ok" not in before.status  # only the script fills it in

    dom = dump_dom(chromium, path, tmp_path / "profile")
    t_browser = time.perf_counter() - t0 - t_write
    page = Page(dom)

    # Every image decoded in the browser, and there are as many as the inputs call for.
    plots = 3  # Recall@K, similarity histograms, training curves
    thumbs = sum(1 + min(TOP_K, len(r["neighbours"])) for r in retrievals)
    assert [i.get("data-role") for i in page.imgs].count("plot") == plots
    assert [i.get("data-role") for i in page.imgs].count("thumb") == thumbs
    assert page.status is not None, "no status element"
    assert page.status.get("data-images-total") == str(plots + thumbs), page.status
    assert page.status.get("data-images-ok") == str(plots + thumbs), page.status
    assert page.status.get("class") == "ok"
    assert any(i["src"].startswith("data:image/jpeg") for i in page.imgs)  # the photo row
    assert any(i["src"].startswith("data:image/png") and i.get("data-role") == "thumb" for i in page.imgs)

    # Every keyed number is metrics.json's, exactly; every numeric entry is keyed once.
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keyed = dict(page.keyed)
    assert len(keyed) == len(page.keyed), "a key shown twice"
    assert set(keyed) == set(numeric)
    for key, shown in keyed.items():
        want = metrics[key]
        assert shown is not None, key
        got = float(shown)
        assert got == want or (math.isnan(got) and math.isnan(want)), (key, shown, want)
    assert keyed["nmi"] == "0.30000000000000004" and keyed["queries"] == "14384"

    # The sections, the labels and the separation verdict.
    assert page.sections == ["metrics", "recall", "similarities", "retrievals", "training"]
    assert not any(n.startswith("no ") for n in page.notes), page.notes
    assert "china <b>&amp; co</b>query" in page.figcaptions
    assert "Best separation: <b>PDDM score</b>" in dom
    assert_self_contained(raw, Page(raw))
    assert time.perf_counter() - t0 < 60

    # The status check is real: a page with one image that cannot decode says so.
    broken = out_dir / "broken.html"
    first = before.imgs[0]["src"]
    broken.write_text(raw.replace(first, "data:image/png;base64,AAAA", 1), encoding="utf-8")
    bad = Page(dump_dom(chromium, broken, tmp_path / "profile2"))
    assert bad.status.get("data-images-total") == str(plots + thumbs)
    assert bad.status.get("data-images-ok") == str(plots + thumbs - 1)
    assert bad.status.get("class") == "bad"
    print(f"report written in {t_write:.1f} s, chromium {t_browser:.1f} s ({len(raw) / 1e3:.0f} kB)")
