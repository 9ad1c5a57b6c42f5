"""EMA, SWA and BatchNorm recomputation: the arithmetic, checked against closed forms on toy models."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transferkit.pipelines.train.averaging import EMA_KEY, EMACallback, SWACallback, recompute_batchnorm


class Toy(pl.LightningModule):
    """Linear + BatchNorm on 4 features, 3 classes; batches are (x, y, index) like ImageDataset's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class ToyWithVal(Toy):
    def validation_step(self, batch, batch_idx):
        pass  # the raw model's metrics do not matter here; the EMA callback computes its own


class Record(pl.Callback):
    """The model's float tensors after every optimizer step."""

    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def _toy_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x, y, torch.arange(n))


def _trainer(callbacks, epochs, tmp_path, **kw):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)


def test_ema_matches_the_closed_form_with_warmup_and_is_what_the_checkpoint_holds(tmp_path):
    decay = 0.5  # reached at t = 8: both the warmup and the cap are exercised over 12 steps
    ema, rec = EMACallback(decay), Record()
    module = Toy()
    trainer = _trainer([rec, ema], epochs=3, tmp_path=tmp_path)
    trainer.fit(module, DataLoader(_toy_data(), batch_size=12))
    assert len(rec.states) == 12
    expected = dict(rec.states[0])
    for t, state in enumerate(rec.states[1:], start=1):
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: (d * expected[k] + (1 - d) * v if v.is_floating_point() else v) for k, v in state.items()}
    got = ema.average.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    # the running statistics are averaged too, and differ from the last step's
    assert not torch.allclose(got["1.running_mean"], rec.states[-1]["1.running_mean"])

    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    for k, v in expected.items():
        torch.testing.assert_close(ckpt[EMA_KEY]["model." + k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(ckpt["state_dict"]["model." + k], rec.states[-1][k])  # raw stays raw
    assert ckpt["callbacks"]["EMACallback"] == {"n_averaged": 12, "last_step": 12}


def test_ema_is_validated_beside_the_raw_weights(tmp_path):
    ema = EMACallback(0.9)
    module = ToyWithVal()
    val = _toy_data(30, seed=1)
    trainer = _trainer([ema], epochs=2, tmp_path=tmp_path)
    trainer.fit(module, DataLoader(_toy_data(), batch_size=12), DataLoader(val, batch_size=7))
    x, y, _ = val.tensors
    with torch.no_grad():
        logits = ema.average.module.eval()(x)
    metrics = trainer.callback_metrics
    assert float(metrics["val_acc_ema"]) == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert float(metrics["val_loss_ema"]) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_swa_is_the_equal_average_of_its_epochs_with_trained_batchnorm_recomputed(tmp_path):
    rec = Record()
    bn_data = _toy_data(40, seed=2)
    swa = SWACallback(tmp_path, epochs=[2, 3], bn_loader=lambda: DataLoader(bn_data, batch_size=8),
                      progress=False)
    trainer = _trainer([rec, swa], epochs=3, tmp_path=tmp_path)
    trainer.fit(Toy(), DataLoader(_toy_data(), batch_size=12))
    saved = torch.load(tmp_path / "swa.ckpt", weights_only=True)
    assert saved["swa_epochs"] == [2, 3]
    w = {k: (rec.states[7][k] + rec.states[11][k]) / 2 for k in ("0.weight", "0.bias", "1.weight")}
    for k, v in w.items():
        torch.testing.assert_close(saved["state_dict"]["model." + k], v, rtol=0, atol=1e-6)
    # BatchNorm statistics of the averaged weights, an equal average over the batches (as update_bn)
    x = bn_data.tensors[0]
    with torch.no_grad():
        h = F.linear(x, w["0.weight"], w["0.bias"]).reshape(5, 8, 3)
    torch.testing.assert_close(saved["state_dict"]["model.1.running_mean"], h.mean((0, 1)), rtol=0, atol=1e-5)
    torch.testing.assert_close(saved["state_dict"]["model.1.running_var"], h.var(1, unbiased=True).mean(0),
                               rtol=1e-4, atol=1e-5)


def test_recompute_batchnorm_leaves_frozen_layers_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    frozen = {k: v.clone() for k, v in net[1].state_dict().items()}
    data = [torch.randn(8, 4) * 3 + 1 for _ in range(3)]  # equal batches: the mean of means is the mean
    assert recompute_batchnorm(net, data, {"3"}, progress=False) == 1
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, frozen[k]), k  # untouched, and used in eval mode meanwhile
    with torch.no_grad():
        h = net[2](net[1](net[0](torch.cat(data))))
    torch.testing.assert_close(net[3].running_mean, h.mean(0), rtol=0, atol=1e-5)
    assert not net.training and net[3].momentum == 0.1
