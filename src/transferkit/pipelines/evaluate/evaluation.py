"""`transferkit evaluate`: metrics of every (TTA, ensemble) combination on a split, in one pass."""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Sequence

from torch.utils.data import DataLoader

from transferkit.errors import ConfigError, DataError
from transferkit.pipelines.data.datasets import ImageDataset, Sample
from transferkit.pipelines.data.failures import FailureLog
from transferkit.pipelines.data.failures import merge as merge_skipped
from transferkit.pipelines.data.folders import scan_folder
from transferkit.pipelines.data.splits import read_skipped_csv, read_split_csv, write_skipped_csv
from transferkit.pipelines.evaluate.calibration import (calibration_record, fit_temperature, store_temperature,
                                                         temperature_of)
from transferkit.pipelines.evaluate.loading import run_config
from transferkit.pipelines.evaluate.metrics import classification_metrics
from transferkit.pipelines.evaluate.page import write_page
from transferkit.pipelines.evaluate.per_image import per_image_rows, write_per_image
from transferkit.pipelines.evaluate.per_image import summary as per_image_summary
from transferkit.pipelines.evaluate.plots import plot_confusion, plot_reliability
from transferkit.pipelines.evaluate.predictor import Predictor
from transferkit.pipelines.rundir import RunDir, safe_load

log = logging.getLogger(__name__)



def eval_samples(run: RunDir, data: str | Path | None, split: str, classes: Sequence[str]) -> list[Sample]:
    """The images to evaluate: the run's saved split, or a folder given now."""
    if data is None:
        path = run.splits / f"{split}.csv"
        if not path.exists():
            raise DataError(f"the run has no saved {split} split ({path}); pass DATA with a {split}/ folder")
        return read_split_csv(path, classes)
    scan = scan_folder(data)
    if scan.presplit:
        if split not in scan.splits:
            raise DataError(f"{data} has no {split}/ folder; use --split val, or pass a folder of class folders")
        samples = scan.splits[split]
    else:
        samples = scan.splits["train"]
    if list(scan.classes) != list(classes):
        raise DataError(f"{data} has classes {scan.classes} but the run was trained on {list(classes)};"
                        " evaluate on a folder with the same class sub-folders")
    return samples


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, split: str = "val",
                 checkpoint: str = "best", tta: str | Sequence[str] = "plain",
                 ensemble: str | Sequence[str] = "none", merge: str = "mean", batch_size: int | None = None,
                 workers: int = 0, progress: bool = True, accelerator: str = "auto", calibrate: bool = False,
                 select: bool = False, per_image: str = "best") -> dict:
    """Metrics of every (TTA, ensemble) combination on a split; writes RUN/evaluation.json, and the
    confusion matrix and reliability diagram of the best combination (accuracy, then NLL).

    `calibrate`: first fit a temperature for the `checkpoint` weights on the run's val split and
    store it in the checkpoint (every result below then uses it). `select`: record the combination
    with the lowest val NLL in RUN/selected.json, which `predict` then uses by default.
    `per_image`: write RUN/predictions-<split>.csv for the best combination ("best"), and also
    predictions-<split>-<tta>-<ensemble>.csv for every combination ("all").
    """
    if per_image not in ("best", "all"):
        raise ConfigError(f"--per-image {per_image!r}: expected 'best' or 'all'")
    run = RunDir.open(run_dir)
    classes = run.classes()
    cfg = run_config(run)
    if select and (split != "val" or data is not None):
        raise ConfigError("--select picks on the run's val split; drop --split and DATA")
    calibration = None
    if calibrate:
        calibration = _calibrate(run, checkpoint, classes, batch_size or cfg.batch_size, workers, accelerator, progress)
    predictor = Predictor.for_run(run, tta, ensemble, checkpoint=checkpoint, merge=merge, accelerator=accelerator)
    samples = eval_samples(run, data, split, classes)
    probs, labels, index, lost = _predict(predictor, samples, split, batch_size or cfg.batch_size, workers,
                                          progress)
    if lost:  # left out of every metric, and listed with the run's other left-out files
        log.warning("left %d unreadable image(s) out of the evaluation, e.g. %s (%s)", len(lost), lost[0].path,
                    lost[0].reason)
        write_skipped_csv(run.skipped, merge_skipped(read_skipped_csv(run.skipped), lost))
    results = []
    for c, p in zip(predictor.combinations, probs):
        metrics = classification_metrics(p, labels, classes)
        results.append({"split": split, "data": str(data) if data else "run split", "checkpoint": checkpoint,
                        "tta": c.tta, "ensemble": c.ensemble, "merge": merge, "views": len(c.views),
                        "members": predictor.member_names(c), **metrics})
    best = min(range(len(results)), key=lambda i: (-results[i]["accuracy"], results[i]["nll"], i))
    body = {"run": str(run.path), "classes": classes, "split": split, "checkpoint": checkpoint, "merge": merge,
            "best": {"tta": results[best]["tta"], "ensemble": results[best]["ensemble"]}, "results": results,
            "skipped": [e._asdict() for e in lost]}
    paths = [str(samples[i].path) for i in index]
    for i, c in enumerate(predictor.combinations):
        if i == best or per_image == "all":
            rows = per_image_rows(paths, probs[i], labels, classes)
            if i == best:
                write_per_image(rows, run.predictions(split))
                body.update(per_image_summary(rows))
            if per_image == "all":
                write_per_image(rows, run.predictions(split, combination_name(c.tta, c.ensemble)))
    if calibration is not None:
        body["calibration"] = calibration
    if select:
        pick = min(results, key=lambda r: (r["nll"], -r["accuracy"]))
        body["selected"] = {k: pick[k] for k in ("tta", "ensemble", "merge", "checkpoint", "nll", "accuracy")}
        run.write_json(run.selected, body["selected"])
        log.info("selected for predict: --tta %s --ensemble %s (val NLL %.4f)", pick["tta"], pick["ensemble"],
                 pick["nll"])
    run.write_json(run.evaluation, body)
    r = results[best]
    label = f"{split}, {r['tta']} / ensemble {r['ensemble']}"
    plot_confusion(r["confusion_matrix"], classes, run.plots / f"confusion-{split}.png",
                   title=f"{label}: accuracy {r['accuracy']:.3f}")
    plot_reliability(probs[best], labels, run.plots / f"reliability-{split}.png",
                     title=f"{label}: ECE {r['ece']:.3f}")
    write_page(run)
    log.info("evaluation written to %s", run.evaluation)
    return body


def _predict(predictor: Predictor, samples: list[Sample], split: str, batch_size: int, workers: int,
             progress: bool):
    """Probabilities of every combination, labels, and the files that could not be read."""
    with tempfile.TemporaryDirectory(prefix="transferkit-evaluate-") as tmp:
        failures = FailureLog(tmp)
        loader = DataLoader(ImageDataset(samples, predictor.transform, replace_failed=True, stage=f"evaluate {split}",
                                         failures=failures, rule=predictor.rule),
                            batch_size=predictor.images_per_batch(batch_size), num_workers=workers)
        probs, labels, index = predictor.predict(loader, desc=f"evaluating {split}", progress=progress)
        lost = failures.entries()
    return probs, labels, index, lost


def _calibrate(run: RunDir, checkpoint: str, classes: list[str], batch_size: int, workers: int, accelerator: str,
               progress: bool) -> dict:
    """Fit a temperature for `checkpoint` on the run's val split (on top of any it holds) and store it."""
    predictor = Predictor.for_run(run, "plain", "none", checkpoint=checkpoint, accelerator=accelerator)
    probs, labels, _, _ = _predict(predictor, read_split_csv(run.splits / "val.csv", classes), "val", batch_size,
                                workers, progress)
    path = run.checkpoint(checkpoint)
    held = temperature_of(safe_load(path))
    extra = fit_temperature(probs[0], labels)
    record = calibration_record(probs[0], labels, extra)
    record["temperature"] = held * extra  # softmax(log softmax(z / a) / b) = softmax(z / (a b))
    store_temperature(path, record["temperature"])
    return record


def combination_name(tta: str, ensemble: str) -> str:
    """A (TTA, ensemble) pair as a file-name part: ``ten-crop-ema``, ``multiscale_0.9_1.1-none``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", tta) + "-" + re.sub(r"[^A-Za-z0-9.-]+", "_", ensemble)


def results_table(body: dict) -> str:
    """The results of ``evaluate_run`` as one text table, the best combination marked with ``*``."""
    rows = body["results"]
    top5 = any("top5_accuracy" in r for r in rows)
    wt = max([3] + [len(r["tta"]) for r in rows])
    we = max([8] + [len(r["ensemble"]) for r in rows])
    head = (f"  {'tta':<{wt}} {'ensemble':<{we}} {'models':>6} {'views':>5} {'accuracy':>9}"
            + (f" {'top5':>7}" if top5 else "") + f" {'macro_f1':>9} {'nll':>8} {'ece':>7} {'n':>6}")
    lines = [head]
    best = body.get("best", {})
    for r in rows:
        mark = "*" if (r["tta"], r["ensemble"]) == (best.get("tta"), best.get("ensemble")) else " "
        lines.append(f"{mark} {r['tta']:<{wt}} {r['ensemble']:<{we}} {len(r['members']):>6} {r['views']:>5}"
                     f" {r['accuracy']:>9.4f}" + (f" {r.get('top5_accuracy', float('nan')):>7.4f}" if top5 else "")
                     + f" {r['macro_f1']:>9.4f} {r['nll']:>8.4f} {r['ece']:>7.4f} {r['count']:>6d}")
    return "\n".join(lines)


