"""RUN/report.html: one page a person reads to judge a run, written by `fit`, refreshed by `evaluate`.

Self-contained: pictures are inlined as data URIs (JPEG thumbnails at most ``THUMB`` px, PNG
plots), the style is inline, and there is no script, font or link outside the file, so it opens
offline in any browser and can be mailed as it is. Its size is bounded whatever the run's size:
thumbnails only for the top losses and the most confused pairs, capped, and the confusion matrix
as a table only up to ``MATRIX_CLASSES`` classes (its most confused pairs above that).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from transferkit.pipelines.data.images import DECODE_ERRORS, describe_error, load_thumbnail
from transferkit.pipelines.data.splits import CSV_TEXT, read_skipped_csv
from transferkit.pipelines.evaluate.metrics import confidence_bins, ece_of
from transferkit.pipelines.evaluate.per_image import MOST_CONFUSED, TOP_LOSSES, most_confused, read_per_image, top_losses
from transferkit.pipelines.rundir import RunDir, atomic_write

log = logging.getLogger(__name__)

THUMB = 128
PER_CELL = 12  # thumbnails per confused pair
MATRIX_CLASSES = 30
SKIPPED_ROWS = 200

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
nav a{margin-right:12px}.sub{color:#5b6475}
table{border-collapse:collapse;background:#fff;margin:6px 0}td,th{border:1px solid #d8dce3;padding:3px 8px;text-align:right}
th{background:#eef0f4}td.l,th.l{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:6px;width:140px;font-size:12px}
.card img{display:block;margin:0 auto 4px;max-width:128px;max-height:128px}.card .p{word-break:break-all;color:#5b6475}
.kpi{display:inline-block;background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:6px 12px;margin:4px 8px 4px 0}
.kpi b{font-size:18px}pre{background:#fff;border:1px solid #d8dce3;padding:8px;overflow:auto;font-size:12px}
img.plot{max-width:100%;background:#fff;border:1px solid #d8dce3}.bad{color:#b3261e}.ok{color:#1e7b34}
"""


def write_page(run: RunDir) -> Path:
    """(Re)write RUN/report.html from what the run directory holds now."""
    page = _Page(run)
    with atomic_write(run.page, "w", encoding="utf-8") as f:
        f.write(page.render())
    log.info("report page written to %s", run.page)
    return run.page


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _png(path: Path) -> str | None:
    try:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    except OSError:
        return None


class _Page:
    """The sections of the page, each from the files that hold its numbers."""

    def __init__(self, run: RunDir):
        self.run = run
        self.report = _read_json(run.report) or {}
        self.evaluation = _read_json(run.evaluation)
        self.classes = run.classes()
        self._thumbs: dict[str, str] = {}
        # The per-image rows of the latest evaluation (evaluate refreshes its split's file), else fit's val.
        split = (self.evaluation or {}).get("split", "val")
        path = run.predictions(split)
        if not path.is_file():
            split, path = "val", run.predictions("val")
        self.split = split
        self.rows = read_per_image(path) if path.is_file() else []

    # --- pieces ---------------------------------------------------------------------------------

    def thumb(self, path: str) -> str:
        if path not in self._thumbs:
            try:
                im = load_thumbnail(path, THUMB)
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=80)
                self._thumbs[path] = f'<img alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
            except (*DECODE_ERRORS, OSError) as exc:
                self._thumbs[path] = f'<div class="bad">cannot show: {_e(describe_error(exc))}</div>'
        return self._thumbs[path]

    def card(self, r: dict) -> str:
        return (f'<div class="card">{self.thumb(r["path"])}<div>true <b>{_e(r["label"])}</b></div>'
                f'<div>predicted <b class="bad">{_e(r["predicted"])}</b> {r["probability"]:.3f}</div>'
                f'<div>loss {r["loss"]:.2f}</div><div class="p" title="{_e(r["path"])}">{_e(Path(r["path"]).name)}</div></div>')

    # --- sections -------------------------------------------------------------------------------

    def header(self) -> str:
        r = self.report
        kpis = []
        best = self.best_result()
        if best is not None:
            kpis.append(f'<span class="kpi">{_e(self.split)} accuracy <b>{best["accuracy"]:.4f}</b></span>')
            kpis.append(f'<span class="kpi">macro-F1 <b>{best["macro_f1"]:.4f}</b></span>')
            if "nll" in best:
                kpis.append(f'<span class="kpi">NLL <b>{best["nll"]:.4f}</b> ECE <b>{best["ece"]:.4f}</b></span>')
        ft = r.get("finetune", {})
        sub = " · ".join(_e(x) for x in (r.get("backbone"), ft.get("strategy"), f"{len(self.classes)} classes",
                                          f"{r.get('epochs_trained', '?')} epoch(s)") if x)
        return (f"<h1>transferkit run: {_e(self.run.path.name)}</h1><div class='sub'>{sub} · {_e(self.run.path)}</div>"
                f"<div>{''.join(kpis)}</div>")

    def best_result(self) -> dict | None:
        if self.evaluation:
            b = self.evaluation.get("best", {})
            for res in self.evaluation.get("results", []):
                if (res["tta"], res["ensemble"]) == (b.get("tta"), b.get("ensemble")):
                    return res
        return self.report.get("metrics")

    def data(self) -> str:
        counts = {}
        for split in ("train", "val", "test"):
            path = self.run.splits / f"{split}.csv"
            if path.is_file():
                with path.open(**CSV_TEXT) as f:
                    counts[split] = Counter(r["label"] for r in csv.DictReader(f))
        head = "".join(f"<th>{s}</th>" for s in counts)
        body = "".join(f"<tr><td class='l'>{_e(c)}</td>" + "".join(f"<td>{counts[s].get(c, 0)}</td>" for s in counts)
                       + "</tr>" for c in self.classes)
        total = "".join(f"<td><b>{sum(counts[s].values())}</b></td>" for s in counts)
        out = [f"<h2 id='data'>Data</h2><table><tr><th class='l'>class</th>{head}</tr>{body}"
               f"<tr><td class='l'><b>all</b></td>{total}</tr></table>"]
        skipped = read_skipped_csv(self.run.skipped)
        if skipped:
            rows = "".join(f"<tr><td class='l'>{_e(s.path)}</td><td class='l'>{_e(s.stage)}</td>"
                           f"<td class='l'>{_e(s.reason)}</td></tr>" for s in skipped[:SKIPPED_ROWS])
            more = (f"<p>and {len(skipped) - SKIPPED_ROWS} more in skipped.csv</p>"
                    if len(skipped) > SKIPPED_ROWS else "")
            out.append(f"<h3>{len(skipped)} file(s) left out</h3><table><tr><th class='l'>path</th>"
                       f"<th class='l'>stage</th><th class='l'>reason</th></tr>{rows}</table>{more}")
        else:
            out.append("<p>No file was left out.</p>")
        return "".join(out)

    def strategy(self) -> str:
        ft = self.report.get("finetune")
        if not ft:
            return ""
        out = [f"<h2 id='strategy'>Strategy: {_e(ft['strategy'])}</h2><p>{_e(ft.get('reason', ''))}</p>",
               f"<p>trains: {_e(', '.join(ft.get('trainable_groups', [])))}; frozen: "
               f"{_e(', '.join(ft.get('frozen_groups', [])) or 'nothing')}; head lr {_e(ft.get('lr'))}, layer decay "
               f"{_e(ft.get('layer_decay'))}; {ft.get('trainable_parameters', 0):,} of "
               f"{ft.get('total_parameters', 0):,} parameters train</p>"]
        advice = ft.get("advice")
        if advice:
            reasons = "".join(f"<li>{_e(x)}</li>" for x in advice.get("reasons", []))
            m = advice.get("measurements", {})
            probe = m.get("probe", {})
            out.append(f"<h3>The advisor's reasons</h3><ul>{reasons}</ul><table>"
                       f"<tr><th class='l'>measurement</th><th>value</th></tr>"
                       f"<tr><td class='l'>expected freeze accuracy (probe, {probe.get('folds')}-fold)</td>"
                       f"<td>{_fmt(probe.get('logreg'))}</td></tr>"
                       f"<tr><td class='l'>k-NN probe</td><td>{_fmt(probe.get('knn'))}</td></tr>"
                       f"<tr><td class='l'>chance</td><td>{_fmt(probe.get('chance'))}</td></tr>"
                       f"<tr><td class='l'>LogME</td><td>{_fmt(m.get('logme'))}</td></tr>"
                       f"<tr><td class='l'>BatchNorm shift</td><td>{_fmt(m.get('bn_shift'))}</td></tr>"
                       f"<tr><td class='l'>margins</td><td>{_e(advice.get('margins'))}</td></tr>"
                       f"<tr><td class='l'>runner-up</td><td>{_e(advice.get('runner_up') or 'none')}</td></tr></table>")
        solver = self.report.get("head_solver")
        if solver:
            folds = ", ".join(f"{a:.3f}" for a in solver.get("fold_accuracy") or [])
            out.append(f"<p>head solved by L-BFGS: L2 {_e(solver.get('l2'))} chosen by {_e(solver.get('folds'))}-fold "
                       f"cross-validation (accuracy {_fmt(solver.get('cv_accuracy'))}; folds {folds}), "
                       f"{_e(solver.get('iterations'))} iterations</p>")
        return "".join(out)

    def curves(self) -> str:
        src = _png(self.run.plots / "curves.png")
        if src is None:
            return ""
        return (f"<h2 id='curves'>Training</h2><img class='plot' alt='loss, accuracy and learning rate per epoch'"
                f" src='{src}'>")

    def quality(self) -> str:
        best = self.best_result()
        if not best:
            return ""
        which = (f"{self.split}, TTA {self.evaluation['best']['tta']}, ensemble {self.evaluation['best']['ensemble']}"
                 if self.evaluation else "val, best checkpoint")
        pc = best.get("per_class", {})
        rows = "".join(f"<tr><td class='l'>{_e(c)}</td><td>{v['precision']:.3f}</td><td>{v['recall']:.3f}</td>"
                       f"<td>{v['f1-score']:.3f}</td><td>{int(v['support'])}</td></tr>" for c, v in pc.items())
        out = [f"<h2 id='quality'>Per class ({_e(which)})</h2><table><tr><th class='l'>class</th><th>precision</th>"
               f"<th>recall</th><th>F1</th><th>images</th></tr>{rows}</table>"]
        out.append(self.confusion(best.get("confusion_matrix")))
        return "".join(out)

    def confusion(self, cm) -> str:
        pairs = most_confused(self.rows, MOST_CONFUSED)
        linked = {(p["label"], p["predicted"]) for p in pairs}
        anchor = {key: f"cm-{i}" for i, key in enumerate(sorted(linked))}
        out = ["<h3>Confusion matrix</h3>"]
        if cm is not None and len(self.classes) <= MATRIX_CLASSES:
            cm = np.asarray(cm)
            hi = max(int(cm.max()), 1)
            head = "".join(f"<th>{_e(c)}</th>" for c in self.classes)
            body = []
            for i, true in enumerate(self.classes):
                cells = []
                for j, pred in enumerate(self.classes):
                    n = int(cm[i, j])
                    shade = f"background:rgba({'30,123,52' if i == j else '179,38,30'},{0.08 + 0.6 * n / hi:.2f})" if n else ""
                    text = (f"<a href='#{anchor[(true, pred)]}'>{n}</a>" if (true, pred) in anchor else str(n))
                    cells.append(f"<td style='{shade}'>{text}</td>")
                body.append(f"<tr><th class='l'>{_e(true)}</th>{''.join(cells)}</tr>")
            out.append(f"<p class='sub'>rows: true class; columns: predicted. A red count links to its images.</p>"
                       f"<table><tr><th class='l'>true \\ predicted</th>{head}</tr>{''.join(body)}</table>")
        if not pairs:
            out.append("<p class='ok'>No image of this split is misclassified.</p>")
            return "".join(out)
        out.append("<h3>Most confused pairs</h3>")
        for p in pairs:
            wrong = [r for r in self.rows if not r["correct"] and (r["label"], r["predicted"]) == (p["label"], p["predicted"])]
            wrong.sort(key=lambda r: -r["loss"])
            cards = "".join(self.card(r) for r in wrong[:PER_CELL])
            more = f"<p class='sub'>and {len(wrong) - PER_CELL} more</p>" if len(wrong) > PER_CELL else ""
            out.append(f"<h3 id='{anchor[(p['label'], p['predicted'])]}'>{_e(p['label'])} predicted as "
                       f"{_e(p['predicted'])}: {p['count']}</h3><div class='cards'>{cards}</div>{more}")
        return "".join(out)

    def losses(self) -> str:
        worst = top_losses(self.rows, TOP_LOSSES)
        if not worst:
            return ""
        cards = "".join(self.card(r) for r in worst)
        return (f"<h2 id='losses'>Top losses ({len(worst)} most confidently wrong of {len(self.rows)}, {_e(self.split)})"
                f"</h2><div class='cards'>{cards}</div>")

    def calibration(self) -> str:
        if not self.rows:
            return ""
        conf = np.array([r["probability"] for r in self.rows])
        correct = np.array([r["correct"] for r in self.rows])
        b = confidence_bins(conf, correct)
        ece = ece_of(b)
        w, h, pad = 320, 320, 36
        sx = lambda v: pad + v * (w - 2 * pad)  # noqa: E731
        sy = lambda v: h - pad - v * (h - 2 * pad)  # noqa: E731
        bars = []
        for lo, hi_, acc, n in zip(b["edges"][:-1], b["edges"][1:], b["accuracy"], b["count"]):
            if n:
                bars.append(f"<rect x='{sx(lo):.1f}' y='{sy(acc):.1f}' width='{sx(hi_) - sx(lo) - 1:.1f}' "
                            f"height='{sy(0) - sy(acc):.1f}' fill='#4a78c2'><title>{int(n)} images, accuracy "
                            f"{acc:.2f}</title></rect>")
        svg = (f"<svg width='{w}' height='{h}' role='img' "
               f"aria-label='reliability diagram' style='background:#fff;border:1px solid #d8dce3'>{''.join(bars)}"
               f"<line x1='{sx(0)}' y1='{sy(0)}' x2='{sx(1)}' y2='{sy(1)}' stroke='#888' stroke-dasharray='4'/>"
               f"<line x1='{sx(0)}' y1='{sy(0)}' x2='{sx(1)}' y2='{sy(0)}' stroke='#333'/>"
               f"<line x1='{sx(0)}' y1='{sy(0)}' x2='{sx(0)}' y2='{sy(1)}' stroke='#333'/>"
               f"<text x='{w / 2}' y='{h - 8}' text-anchor='middle' font-size='12'>confidence</text>"
               f"<text x='12' y='{h / 2}' font-size='12' transform='rotate(-90 12 {h / 2})' text-anchor='middle'>"
               f"accuracy</text></svg>")
        return (f"<h2 id='calibration'>Calibration</h2><p>expected calibration error {ece:.4f} (15 bins, "
                f"{len(self.rows)} images of {_e(self.split)}); bars: accuracy per confidence bin, dashed: perfect "
                f"calibration.</p>{svg}")

    def tta(self) -> str:
        ev = self.evaluation
        if not ev:
            return ""
        best = ev.get("best", {})
        rows = []
        for r in ev.get("results", []):
            mark = "*" if (r["tta"], r["ensemble"]) == (best.get("tta"), best.get("ensemble")) else ""
            rows.append(f"<tr><td class='l'>{mark}{_e(r['tta'])}</td><td class='l'>{_e(r['ensemble'])}</td>"
                        f"<td>{len(r['members'])}</td><td>{r['views']}</td><td>{r['accuracy']:.4f}</td>"
                        f"<td>{r['macro_f1']:.4f}</td><td>{r['nll']:.4f}</td><td>{r['ece']:.4f}</td></tr>")
        return (f"<h2 id='tta'>Test-time augmentation x ensembles ({_e(ev.get('split'))}, checkpoint "
                f"{_e(ev.get('checkpoint'))})</h2><table><tr><th class='l'>tta</th><th class='l'>ensemble</th>"
                f"<th>models</th><th>views</th><th>accuracy</th><th>macro-F1</th><th>NLL</th><th>ECE</th></tr>"
                f"{''.join(rows)}</table><p class='sub'>* the best (accuracy, then NLL)</p>")

    def config(self) -> str:
        try:
            text = self.run.config.read_text(encoding="utf-8")
        except OSError:
            return ""
        return (f"<h2 id='config'>Config</h2><p>Replay this run: <code>transferkit fit --config "
                f"{_e(self.run.config)}</code> (flags given beside it override).</p><pre>{_e(text)}</pre>")

    def render(self) -> str:
        parts = [("data", "data", self.data()), ("strategy", "strategy", self.strategy()),
                 ("curves", "training", self.curves()), ("quality", "per class", self.quality()),
                 ("losses", "top losses", self.losses()), ("calibration", "calibration", self.calibration()),
                 ("tta", "TTA", self.tta()), ("config", "config", self.config())]
        nav = " ".join(f"<a href='#{key}'>{name}</a>" for key, name, body in parts if body)
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
                f"<title>transferkit: {_e(self.run.path.name)}</title><style>{STYLE}</style></head>"
                f"<body><main><nav>{nav}</nav>{self.header()}{''.join(body for _, _, body in parts)}</main>"
                f"</body></html>\n")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else _e(x)
