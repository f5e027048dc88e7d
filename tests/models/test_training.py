"""fit_representation: reproducible on CPU, NaN-safe, early stopping restores the best epoch."""

import math

import numpy as np
import pytest
import torch

from gsafe_models.nets import VAE, AutoEncoder
from gsafe_models.normalise import BandNormaliser
from gsafe_models.training import EarlyStopping, fit_representation


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16] - 7.5
    amp = rng.lognormal(3, 0.5, size=(n, 1, 1, 1))
    blob = amp * np.exp(-(yy**2 + xx**2) / (2 * rng.uniform(1, 3, size=(n, 1, 1, 1)) ** 2))
    x = blob * np.array([0.5, 1.0, 1.5])[None, :, None, None] + rng.normal(size=(n, 3, 16, 16))
    return x.astype(np.float32)


def _factory(x, bs=16):
    return lambda: (x[i : i + bs] for i in range(0, len(x), bs))


def _train(model_cls, x, seed=0, **kw):
    torch.manual_seed(seed)
    model = model_cls((3, 16, 16), 4, channels=(8, 16)) if model_cls is AutoEncoder else VAE((3, 16, 16), 4, 1.0, (8, 16))
    norm = BandNormaliser(3).fit(x)
    history = fit_representation(model, norm, _factory(x), _factory(x[:16]), epochs=3, seed=seed, device="cpu", **kw)
    return model, history


@pytest.mark.parametrize("model_cls", [AutoEncoder, VAE])
def test_same_seed_gives_the_same_losses(model_cls):
    x = _data()
    _, h1 = _train(model_cls, x)
    _, h2 = _train(model_cls, x)
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert [r["val_loss"] for r in h1] == [r["val_loss"] for r in h2]


def test_loss_decreases():
    _, history = _train(AutoEncoder, _data(128), lr=3e-3)
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_nan_pixels_do_not_produce_nan_loss():
    x = _data()
    x[::3, 1, 2:6, 2:6] = np.nan
    x[5, :, :, 0] = np.nan
    model, history = _train(AutoEncoder, x)
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in history)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_early_stopping_restores_the_best_epoch():
    x = _data()
    norm = BandNormaliser(3).fit(x)
    torch.manual_seed(0)
    model = AutoEncoder((3, 16, 16), 4, channels=(8, 16))
    # A learning rate this large diverges after the first epochs: the best state must come back.
    history = fit_representation(model, norm, _factory(x), _factory(x[:16]), epochs=8, lr=0.5, patience=2, device="cpu")
    best = min(r["val_loss"] for r in history)
    x_val = torch.from_numpy(x[:16])
    with torch.no_grad():
        loss, _ = model.loss(*norm(x_val))
    assert loss.item() == pytest.approx(best, rel=1e-4)
    assert len(history) < 8 or history[-1]["val_loss"] >= best


def test_progress_reports_batches_and_epochs():
    events = []
    _train(AutoEncoder, _data(32), progress=events.append)
    assert sum(e["event"] == "epoch" for e in events) == 3
    assert sum(e["event"] == "batch" for e in events) == 6
    assert all("epoch" not in e for e in events if e["event"] == "batch")


def test_early_stopping_rule_shared_by_every_training_loop():
    net = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(net, patience=2, min_delta=0.1)
    with torch.no_grad():
        net.weight.fill_(1.0)
    assert not stopper.step(5.0)                       # best: weights 1
    with torch.no_grad():
        net.weight.fill_(2.0)
    assert not stopper.step(4.95)                      # within min_delta: no improvement
    assert stopper.step(6.0)                           # second epoch without one: stop
    stopper.restore()
    assert torch.all(net.weight == 1.0) and (stopper.best, stopper.best_epoch) == (5.0, 0)

    never = EarlyStopping(net, patience=None)          # keeps the best, never says stop
    assert not any(never.step(x) for x in (1.0, *[2.0] * 50))

    fresh = torch.nn.Linear(2, 1)
    initial = fresh.weight.detach().clone()
    nan = EarlyStopping(fresh, patience=1)
    with torch.no_grad():
        fresh.weight.fill_(float("nan"))
    assert nan.step(float("nan"))                      # a NaN loss never improves
    nan.restore()
    assert torch.equal(fresh.weight, initial)          # the weights from before training
    with pytest.raises(ValueError, match="patience=0"):
        EarlyStopping(net, patience=0)
