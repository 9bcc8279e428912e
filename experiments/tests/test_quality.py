"""experiments/quality.py's own machinery: the augmentation and parallel runs that write each record once.

``quality`` and ``diagnose`` import as top-level modules: experiments/conftest.py puts experiments/ on sys.path."""

import json
import subprocess
import sys
from pathlib import Path

import diagnose
import numpy as np
import pytest
import quality
import torch

from distpddm.data.glyphs import GlyphSet

QUALITY = Path(quality.__file__)


def test_pad_crop_is_a_translation_within_the_pad():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 10)
    out = quality.pad_crop(2)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    assert out.shape == x.shape
    for i in range(len(x)):  # each image is one of the 5 x 5 shifted windows of its padded copy
        windows = [padded[i, :, dy : dy + 12, dx : dx + 10] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # 16 images all left in place by chance: (1/25)^16
    # the same crops as cutting each image's window one by one, for the same random draw
    torch.manual_seed(3)
    got = quality.pad_crop(2)(x)
    torch.manual_seed(3)
    dy, dx = torch.randint(0, 5, (2, len(x))).tolist()
    want = torch.stack([padded[i, :, dy[i] : dy[i] + 12, dx[i] : dx[i] + 10] for i in range(len(x))])
    assert torch.equal(got, want) and got.is_contiguous()


def _glyph_file(tmp_path, fonts: int) -> Path:
    """A glyph set as `quality.py save` writes it: ``fonts`` classes of 6 random 32-px images."""
    rng = np.random.default_rng(0)
    glyphs = tmp_path / "glyphs-{size}px.npz"
    images = rng.integers(0, 256, (fonts * 6, 32, 32), dtype=np.uint8)
    g = GlyphSet(images, np.repeat(np.arange(fonts), 6), [f"f{i}" for i in range(fonts)])
    g.save(str(glyphs).format(size=32))
    back = GlyphSet.load(str(glyphs).format(size=32))
    assert np.array_equal(back.images, g.images) and np.array_equal(back.labels, g.labels)
    assert back.class_names == g.class_names
    return glyphs


def test_parallel_run_writes_every_record_once_and_skips_done(tmp_path):
    glyphs = _glyph_file(tmp_path, 40)  # 20 training fonts: room for the study's 16 x 4 batches
    out = tmp_path / "q.jsonl"
    cmd = [sys.executable, str(QUALITY), "run", "--rows", "pml_ms", "pddm_allpos_b01",
           "--seeds", "0", "--steps", "3", "--curve", "2", "--workers", "2", "--glyphs", str(glyphs),
           "--out", str(out), "--save-embeddings", str(tmp_path / "emb")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["pddm_allpos_b01", "pml_ms"]
    for name in ("pml_ms", "pddm_allpos_b01"):  # what diagnose.py reads: both halves of the split
        with np.load(tmp_path / "emb" / f"scratch_{name}_s0_3.npz") as f:
            assert f["test"].shape == (120, 128) and f["train"].shape == (120, 128)
            assert len(set(f["test_labels"])) == len(set(f["train_labels"])) == 20  # each half relabelled 0..19
            assert not np.allclose(f["test"], f["train"])
            assert np.allclose(np.linalg.norm(f["train"], axis=1), 1, atol=1e-5)
    diag = tmp_path / "d.json"
    diagnose = [sys.executable, str(QUALITY.with_name("diagnose.py"))]
    r = subprocess.run([*diagnose, "compare", str(tmp_path / "emb"), "--seeds", "0", "--steps", "3",
                        "--glyphs", str(glyphs), "--json", str(diag)],
                       check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    d = json.loads(diag.read_text())
    assert (
        sum(d["per_seed"][0]["overlap"].values()) == 120 and [b["fonts"] for b in d["per_seed"][0]["bins"]] == [5] * 4
    )
    assert "| held-out | recall@1 |" in r.stdout
    png = tmp_path / "why.png"
    subprocess.run([*diagnose, "plot", str(png), str(diag)], check=True, capture_output=True, timeout=300)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = tmp_path / "d.csv"  # the summary as one CSV line, held-out B - A as in the markdown
    subprocess.run([*diagnose, "table", str(diag), "--csv", str(table)], check=True, capture_output=True, timeout=120)
    header, line, *rest = table.read_text().splitlines()
    cells = dict(zip(header.split(","), line.split(","), strict=True))
    assert not rest and [cells[k] for k in ("file", "A", "B", "seeds")] == ["d", "pml_ms", "pddm_allpos_b01", "0"]
    gap = d["summary"]["test recall@1"]["B - A"]["mean"]
    assert cells["heldout_recall@1_B-A"] == f"{gap:.3f}" and "map@r_B-A_bin4_sd" in cells
    for r in rows:
        assert r["device"] == "cpu" and r["steps"] == 3 and set(r["curve"]) == {"2", "3"}
        assert 0.0 <= r["final"]["recall@1"] <= 1.0
    assert "rerank" in next(r for r in rows if r["name"] == "pddm_allpos_b01")
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    assert len(out.read_text().splitlines()) == 2 and "seed 0" not in again.stdout


def test_a_failing_row_is_reported_and_the_others_still_run(tmp_path):
    """Too few fonts for a 16 x 4 batch: each row fails with the sampler's own message; exit status 1."""
    glyphs = _glyph_file(tmp_path, 12)
    cmd = [sys.executable, str(QUALITY), "run", "--rows", "pml_ms", "pml_triplet", "--seeds",
           "0", "--steps", "2", "--glyphs", str(glyphs), "--out", str(tmp_path / "q.jsonl")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert "FAILED pml_ms seed 0: ValueError: classes_per_batch" in r.stdout
    assert "FAILED pml_triplet seed 0" in r.stdout


def test_start_within_starts_nothing_once_its_time_has_passed(tmp_path):
    """A study cut to the time left (a GPU lease): rows not started are named, none is recorded or failed."""
    glyphs = _glyph_file(tmp_path, 40)
    out = tmp_path / "q.jsonl"
    for workers in ("1", "2"):
        cmd = [sys.executable, str(QUALITY), "run", "--rows", "pml_ms", "--seeds", "0", "1",
               "--steps", "2", "--glyphs", str(glyphs), "--out", str(out), "--workers", workers,
               "--start-within", "0"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "not started (--start-within 0.0 s passed): [('pml_ms', 0), ('pml_ms', 1)]" in r.stdout
        assert not out.exists() or out.read_text() == ""


def test_save_writes_what_glyphs_reads_for_every_protocol_size(tmp_path, monkeypatch):
    """`save DIR` on a machine with the fonts, `run --glyphs DIR/glyphs-{size}px.npz` on one without."""
    import argparse

    sizes = []

    def fake_load_glyphs(size):
        sizes.append(size)
        rng = np.random.default_rng(size)
        return GlyphSet(rng.integers(0, 256, (12, size, size), dtype=np.uint8), np.repeat(np.arange(3), 4),
                        ["a", "b", "c"])  # fmt: skip

    monkeypatch.setattr(quality, "load_glyphs", fake_load_glyphs)
    quality.cmd_save(argparse.Namespace(dir=tmp_path / "g"))
    assert sorted(sizes) == sorted({p["size"] for p in quality.PROTOCOLS.values()})
    for name, proto in quality.PROTOCOLS.items():
        back = quality.glyph_set(proto["size"], str(tmp_path / "g" / "glyphs-{size}px.npz"))
        assert back.images.shape == (12, proto["size"], proto["size"]), name
        assert np.array_equal(back.images, fake_load_glyphs(proto["size"]).images)


def test_plot_draws_the_recorded_curves_and_refuses_rows_without_runs(tmp_path):
    def rec(name, seed, r1):
        curve = {str(s): {"recall@1": r1 * s / 100, "map@r": r1 * s / 300} for s in (50, 100)}
        return {"name": name, "seed": seed, "steps": 100, "protocol": "scratch", "curve": curve}

    out = tmp_path / "q.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [rec("pml_ms", 0, 0.8), rec("pml_ms", 1, 0.7),
                                                          rec("pddm_allpos_b01", 0, 0.9)]))  # fmt: skip
    png = tmp_path / "curves.png"
    cmd = [sys.executable, str(QUALITY), "plot", str(png), "--steps", "100", "--out", str(out)]
    from PIL import Image

    def colour_pixels(args) -> tuple[int, int]:
        """Pixels of matplotlib's first two line colours (C0, C1): the rows' markers, lines and legend handles."""
        subprocess.run([*cmd, *args], check=True, capture_output=True, text=True, timeout=120)
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 500
            rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
        return tuple(int((rgb == c).all(axis=1).sum()) for c in ((31, 119, 180), (255, 127, 14)))

    both = colour_pixels([])
    assert min(both) > 100  # two rows drawn, each in its own colour
    only_ms = colour_pixels(["--rows", "pml_ms"])
    assert only_ms[0] > 100 and only_ms[1] == 0  # --rows keeps one row: no second colour
    r = subprocess.run([*cmd, "--rows", "pml_triplet"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no runs of ['pml_triplet'] at 100 steps" in r.stderr


def test_curve_labels_say_how_many_seeds_each_point_averages():
    full = {"curve": {"50": {}, "100": {}}}
    assert quality._seed_count([full, full], [50, 100]) == "2 seeds"
    assert quality._seed_count([full], [50, 100]) == "1 seed"
    assert quality._seed_count([full, {"curve": {"100": {}}}], [50, 100]) == "1-2 seeds"  # a run without step 50


def test_separation_histograms_count_every_pair_and_draw_each_metric_of_each_criterion(tmp_path):
    rng = np.random.default_rng(0)
    sims = {
        "negative Euclidean distance": {"positive": -rng.uniform(0.1, 0.5, 300), "negative": -rng.uniform(0.4, 1, 500)},
        "PDDM score": {"positive": rng.normal(1, 0.2, 300), "negative": rng.normal(0, 0.2, 500)},
    }
    sep = quality.separation(sims)
    for metric, d in sims.items():
        h = sep[f"{metric} histogram"]
        assert len(h["edges"]) == quality.HIST_BINS + 1
        assert sum(h["positive"]) == len(d["positive"]) and sum(h["negative"]) == len(d["negative"])
        assert h["edges"][0] == min(d["positive"].min(), d["negative"].min())
    # a saturated float32 metric (scores a few ulps apart) still gets its 40 bins
    flat = np.float32(3.2) + np.arange(4, dtype=np.float32) * np.spacing(np.float32(3.2))
    h = quality.separation({"PDDM score": {"positive": flat[2:], "negative": flat[:2]}})["PDDM score histogram"]
    assert sum(h["positive"]) == 2 and sum(h["negative"]) == 2
    # Euclidean drawn as a distance: bins flipped to increasing distance, positives nearer (lower bins)
    (name, h, auc), (learned, _, _) = quality._histograms({"separation": sep})
    assert (name, learned) == ("Euclidean distance", "PDDM score") and auc == sep["negative Euclidean distance"]
    assert np.all(np.diff(h["edges"]) > 0) and h["edges"][0] >= 0.1 and h["edges"][-1] <= 1
    assert np.argmax(h["positive"]) < np.argmax(h["negative"])

    # the figure: MultiSimilarity (Euclidean only) and PDDM (Euclidean + learned): 3 panels, each with a
    # positive and a negative density that integrate to one
    euclid_only = {k: v for k, v in sep.items() if "PDDM" not in k}
    fig = quality.separation_figure(
        {"pml_ms": {"seed": 0, "separation": euclid_only}, "pddm_allpos_b01": {"seed": 0, "separation": sep}}, "t"
    )
    drawn = [ax for ax in fig.axes if ax.axison]
    assert len(fig.axes) == 4 and len(drawn) == 3
    assert [ax.get_xlabel().split()[0] for ax in drawn] == ["distance", "distance", "score"]
    for ax in drawn:
        steps = [p for p in ax.patches if type(p).__name__ == "StepPatch"]
        assert len(steps) == 2
        for p in steps:
            values, edges, _ = p.get_data()
            assert float((values * np.diff(edges)).sum()) == pytest.approx(1.0)

    # the command: one seed per row, refusing rows recorded before histograms existed
    def rec(name, seed, separation):
        return {"name": name, "seed": seed, "steps": 100, "protocol": "scratch", "separation": separation}

    old = {k: v for k, v in euclid_only.items() if "histogram" not in k}
    out = tmp_path / "q.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in [rec("pml_ms", 0, euclid_only),
        rec("pddm_allpos_b01", 0, sep), rec("pml_triplet", 0, old)]))  # fmt: skip
    png = tmp_path / "sep.png"
    cmd = [sys.executable, str(QUALITY), "plot-separation", str(png), "--steps", "100"]
    from PIL import Image

    def height(args) -> int:
        subprocess.run([*cmd, "--out", str(out), *args], check=True, capture_output=True, text=True, timeout=120)
        with Image.open(png) as im:
            return im.height

    assert height([]) == 2 * height(["--rows", "pml_ms"])  # a panel row per criterion with histograms
    r = subprocess.run([*cmd, "--out", str(out), "--rows", "pml_triplet"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "with recorded histograms" in r.stderr


def test_training_fonts_drops_the_share_raw_pixels_find_hardest():
    """Fonts 2, 5, 8, 11 are copies of one another (raw-pixel Recall@1 0: each glyph's nearest image is its
    copy in another font); the other 8 are distinct: dropping a third of 12 removes exactly the copies."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    copies = [2, 5, 8, 11]
    # each distinct font: one random image plus small noise per glyph, so its glyphs are each other's nearest
    fonts = [
        base if k in copies else (rng.integers(0, 240, (1, 8, 8)) + rng.integers(0, 8, (6, 8, 8))).astype(np.uint8)
        for k in range(12)
    ]
    g = GlyphSet(np.concatenate(fonts), np.repeat(np.arange(12), 6), [f"f{i}" for i in range(12)])
    raw = diagnose.raw_difficulty(g.images, g.labels, np.arange(12))
    assert [k for k in range(12) if raw[k] == 0.0] == copies and all(
        raw[k] == 1.0 for k in range(12) if k not in copies
    )
    kept = quality.training_fonts(g, 1 / 3)
    assert kept.class_names == [f"f{i}" for i in range(12) if i not in copies] and len(kept) == 48
    assert np.array_equal(kept.images, np.concatenate([fonts[k] for k in range(12) if k not in copies]))
    assert quality.training_fonts(g, 0.0) is g


def test_csv_has_one_line_per_protocol_steps_and_row_with_mean_and_sd_over_seeds(tmp_path):
    def rec(name, seed, r1, ap, protocol="scratch64", steps=100):
        return {"name": name, "seed": seed, "steps": steps, "protocol": protocol,
                "final": {"recall@1": r1, "map@r": ap}}  # fmt: skip

    records = [rec("pddm_allpos_b01", 1, 0.9, 0.5), rec("pml_ms", 0, 0.8, 0.4), rec("pddm_allpos_b01", 0, 0.7, 0.3),
               rec("pml_ms", 0, 0.6, 0.2, protocol="lite0"), rec("pml_ms", 0, 0.5, 0.1, steps=50)]  # fmt: skip
    got = quality.csv_rows(records)
    # PROTOCOLS' order (scratch64 before lite0), then steps, then ROWS' order (pml_ms before pddm_allpos_b01)
    assert [(r["protocol"], r["steps"], r["row"]) for r in got] == [
        ("scratch64", 50, "pml_ms"), ("scratch64", 100, "pml_ms"), ("scratch64", 100, "pddm_allpos_b01"),
        ("lite0", 100, "pml_ms"),
    ]  # fmt: skip
    pddm = got[2]
    assert (pddm["seeds"], pddm["seed_list"]) == (2, "0 1")
    assert (pddm["recall@1_mean"], pddm["recall@1_sd"]) == ("0.800", f"{np.std([0.7, 0.9], ddof=1):.3f}")
    assert (pddm["map@r_mean"], pddm["map@r_sd"]) == ("0.400", "0.141")
    assert pddm["description"].startswith("PDDM shipped") and "**" not in pddm["description"]
    assert got[0]["recall@1_sd"] == "" and got[0]["map@r_mean"] == "0.100"  # one seed: no spread

    out, table = tmp_path / "q.jsonl", tmp_path / "t" / "q.csv"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    subprocess.run([sys.executable, str(QUALITY), "table", "--out", str(out), "--csv", str(table)], check=True,
                   capture_output=True, text=True, timeout=120)  # fmt: skip
    import csv

    with table.open() as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(quality.CSV_COLUMNS)
    assert [{k: str(v) for k, v in r.items()} for r in got] == back
