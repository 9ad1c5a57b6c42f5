"""Does temperature scaling make probabilities honest? NLL and ECE before and after, out of sample too.

    python benchmarks/calibration.py [--finetune freeze] [--epochs 5]

On hymenoptera and BreastMNIST (../shared/data) with the real MobileNetV1 x0.25,
`fit --calibrate temperature` fits one temperature on val. Printed: the temperature, val NLL and
ECE before and after (the split it was fitted on), the same on held-out images it never saw
(BreastMNIST's test split; for hymenoptera, which has none, two-fold cross-fitting on val: T
fitted on one half, scored on the other, both ways), and the accuracy, which must not change.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freeze_head import SHARED, breastmnist_folder  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune", default="partial")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    if not (SHARED / "data").is_dir():
        print(f"needs {SHARED / 'data'}", file=sys.stderr)
        return 2
    import logging

    import transferkit
    from transferkit.pipelines.evaluate.calibration import calibration_record, fit_temperature
    from transferkit.pipelines.evaluate.evaluation import eval_samples
    from transferkit.pipelines.rundir import RunDir

    logging.basicConfig(level=logging.WARNING)
    plugin = str(SHARED / "weights" / "mobilenetv1_025.py")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, data in (("hymenoptera", SHARED / "data" / "hymenoptera"),
                           ("breastmnist", breastmnist_folder(tmp / "breastmnist"))):
            run = transferkit.fit(data, backbone="mobilenetv1_025", backbone_plugin=plugin, finetune=args.finetune,
                                  epochs=args.epochs, calibrate="temperature", out=tmp / f"run-{name}", workers=2,
                                  progress=False)
            c = run.report["calibration"]
            print(f"{name} ({args.finetune}, {args.epochs} epochs): T = {c['temperature']:.3f}; val (fitted on it):"
                  f" NLL {c['before']['nll']:.4f} -> {c['after']['nll']:.4f}, ECE {c['before']['ece']:.4f} ->"
                  f" {c['after']['ece']:.4f}")
            if name == "breastmnist":
                # the stored temperature applies to every evaluation: compare with T = 1 on the same test images
                (after,) = run.evaluate(split="test")
                ckpt = run.path / "checkpoints" / "best.ckpt"
                from transferkit.pipelines.evaluate.calibration import store_temperature

                store_temperature(ckpt, 1.0)
                (before,) = run.evaluate(split="test")
                store_temperature(ckpt, c["temperature"])
                print(f"  test (never seen): NLL {before['nll']:.4f} -> {after['nll']:.4f}, ECE {before['ece']:.4f} ->"
                      f" {after['ece']:.4f}, accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}")
            else:
                from torch.utils.data import DataLoader

                from transferkit.pipelines.data.datasets import ImageDataset
                from transferkit.pipelines.evaluate.calibration import store_temperature
                from transferkit.pipelines.evaluate.predictor import Predictor

                rd = RunDir(run.path)
                store_temperature(rd.checkpoint("best"), 1.0)
                predictor = Predictor.for_run(rd)
                samples = eval_samples(rd, None, "val", run.classes)
                probs, labels, _ = predictor.predict(DataLoader(ImageDataset(samples, predictor.transform),
                                                             batch_size=32), progress=False)
                probs = probs[0]
                rng = np.random.default_rng(0)
                half = rng.permutation(len(labels)) < len(labels) // 2
                rows = []
                for fit_on in (half, ~half):
                    t = fit_temperature(probs[fit_on], labels[fit_on])
                    rows.append(calibration_record(probs[~fit_on], labels[~fit_on], t))
                nb = np.mean([r["before"]["nll"] for r in rows])
                na = np.mean([r["after"]["nll"] for r in rows])
                eb = np.mean([r["before"]["ece"] for r in rows])
                ea = np.mean([r["after"]["ece"] for r in rows])
                print(f"  val halves cross-fitted (T from one half, scored on the other): NLL {nb:.4f} -> {na:.4f},"
                      f" ECE {eb:.4f} -> {ea:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
