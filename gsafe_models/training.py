r"""One training loop for every representation: streaming, device-agnostic, seeded, early-stopped."""

__all__ = [
    "EarlyStopping",
    "fit_representation",
    "resolve_device",
]

import contextlib
import copy
import math
import time

from collections.abc import Callable, Iterable

import numpy as np
import torch

from torch import Tensor

from .nets import AutoEncoder, VAE
from .normalise import BandNormaliser

#: A re-iterable source of batches: each call returns an iterable of raw cutouts :math:`(b, B, H, W)`
#: float32, NaN = missing, or of pairs `(cutouts, variances)`, the second their pixel variances
#: (same shape, NaN where unknown) or None (see :func:`unpack_batch`).
BatchFactory = Callable[[], Iterable[np.ndarray]]


def unpack_batch(batch) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Returns `(cutouts, variances or None)` of a batch: an array of cutouts, or a pair of them.

    Example:
        >>> x = np.zeros((2, 1, 4, 4), np.float32)
        >>> unpack_batch(x)[1] is None, unpack_batch((x, x))[1].shape
        (True, (2, 1, 4, 4))
    """

    if isinstance(batch, tuple):
        images, variance = batch
        images = np.asarray(images, dtype=np.float32)
        if variance is not None:
            variance = np.asarray(variance, dtype=np.float32)
            if variance.shape != images.shape:
                raise ValueError(f"unpack_batch: variances of shape {variance.shape} for cutouts of shape {images.shape}")
        return images, variance
    return np.asarray(batch, dtype=np.float32), None


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    r"""Returns `device`, or CUDA when there is one and CPU otherwise."""

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    r"""Turns on deterministic algorithms for the block only, restoring the caller's setting."""

    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


class EarlyStopping:
    r"""Watches one loss per epoch, keeps the weights of the best epoch and says when to stop.

    The one early-stopping rule of gsafe's training loops: an epoch improves when its loss is
    below the best so far by more than `min_delta`; after `patience` epochs in a row without
    improvement, :meth:`step` says stop; :meth:`restore` loads the best epoch's weights (the
    weights at construction if no epoch improved, e.g. every loss was NaN).

    Arguments:
        module: The module whose :py:`state_dict` is kept.
        patience: Epochs without improvement before stopping; None never stops (the best
            weights are still kept).
        min_delta: The margin an improvement must beat the best by.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> stopper = EarlyStopping(net, patience=2)
        >>> [stopper.step(loss) for loss in (3.0, 2.0, 2.5, 2.1)]
        [False, False, False, True]
        >>> stopper.best, stopper.best_epoch
        (2.0, 1)
    """

    def __init__(self, module: torch.nn.Module, patience: int | None = None, min_delta: float = 0.0) -> None:
        if patience is not None and patience < 1:
            raise ValueError(f"EarlyStopping: patience={patience} must be >= 1 (or None: never stop)")
        self.module = module
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.best_epoch: int | None = None
        self.epochs = 0
        self.stale = 0
        self._state = copy.deepcopy(module.state_dict())

    def step(self, loss: float) -> bool:
        r"""Records one epoch's watched loss; returns whether to stop now."""

        epoch, self.epochs = self.epochs, self.epochs + 1
        if loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.stale = float(loss), epoch, 0
            self._state = copy.deepcopy(self.module.state_dict())
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def restore(self) -> None:
        r"""Loads the weights of the best epoch into the module."""

        self.module.load_state_dict(self._state)


def _dihedral(x: Tensor, k: int) -> Tensor:
    r"""Returns one of the 8 rotations/flips of cutouts :math:`(N, B, H, W)` (the sky has no up)."""

    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x


def fit_representation(
    model: AutoEncoder | VAE,
    normaliser: BandNormaliser,
    train: BatchFactory,
    val: BatchFactory | None = None,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    device: str | torch.device | None = None,
    seed: int = 0,
    patience: int = 4,
    augment: bool = True,
    weight_decay: float = 0.0,
    progress: Callable[[dict], None] | None = None,
    optimizer: str = "adam",
) -> list[dict]:
    r"""Trains a representation on raw cutouts streamed in batches; restores the best epoch.

    Every epoch calls `train()` afresh and iterates it, so the survey never has to fit in
    memory; the factory decides the order (shuffle there). NaN pixels are masked out of the
    loss. On CUDA the forward pass runs under autocast (bfloat16 where supported, else float16
    with a gradient scaler); on CPU it runs in float32 with deterministic algorithms, so the same
    seed and batches give the same losses. Early stopping watches the validation loss (the
    training loss when `val` is None) and the weights of the best epoch are restored at the end.

    Arguments:
        model: An :class:`~gsafe_models.nets.AutoEncoder` or :class:`~gsafe_models.nets.VAE`.
        normaliser: A fitted :class:`~gsafe_models.normalise.BandNormaliser`.
        train: Returns an iterable of raw batches :math:`(b, B, H, W)` float32 counts, NaN = missing.
        val: The same for the validation split, or None.
        epochs: The maximum number of epochs.
        lr: Adam's learning rate (cosine-annealed to 5 % over `epochs`).
        device: `"cuda"`, `"cpu"`..., or None for CUDA when present.
        seed: Seeds initialisation-independent randomness (VAE noise, augmentation).
        patience: Stop after this many epochs without improvement.
        augment: Train on random rotations and flips of each batch.
        weight_decay: AdamW's decoupled weight decay.
        optimizer: `"adam"` (AdamW) or `"langevin"`: constrained, preconditioned Langevin dynamics
            at temperature 1e-7 with weights on circles of radius 0.5
            (:class:`~gsafe_models.langevin.ConstrainedLangevin`; `lr` as Adam's, no weight decay).
        progress: Called after every batch with `{"event": "batch", "batch", "loss", ...loss parts}`
            and after every epoch with `{"event": "epoch", ...}` and the epoch's record.

    Returns:
        One dict per epoch: `epoch`, `train_loss`, `val_loss` (None without `val`), `seconds`, `lr`.

    Example:
        >>> from gsafe_models.nets import AutoEncoder
        >>> x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
        >>> norm = BandNormaliser(3).fit(x)
        >>> history = fit_representation(AutoEncoder((3, 16, 16), 4), norm, lambda: [x[:16], x[16:]], epochs=2)
        >>> len(history)
        2
    """

    device = resolve_device(device)
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)

    model.to(device)
    normaliser.to(device)
    if optimizer == "langevin":
        from .langevin import ConstrainedLangevin

        optimiser = ConstrainedLangevin(model.parameters(), lr=lr, temperature=1e-7, radius=0.5)
    elif optimizer == "adam":
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"fit_representation: optimizer={optimizer!r}, expected 'adam' or 'langevin'")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(epochs, 1), eta_min=0.05 * lr)
    generator = torch.Generator().manual_seed(seed)

    def batches(factory: BatchFactory):
        for batch in factory():
            x = torch.as_tensor(unpack_batch(batch)[0]).to(device, non_blocking=True)
            yield normaliser(x)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if cuda else contextlib.nullcontext()

    history: list[dict] = []
    stopper = EarlyStopping(model, patience)

    with _deterministic(not cuda):
        torch.manual_seed(seed)
        for epoch in range(epochs):
            start = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            for i, (x, mask) in enumerate(batches(train)):
                if augment:
                    k = int(torch.randint(8, (1,), generator=generator))
                    x, mask = _dihedral(x, k), _dihedral(mask, k)
                with autocast():
                    loss, parts = model.loss(x, mask)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                scaler.step(optimiser)
                scaler.update()
                total += loss.item() * len(x)
                count += len(x)
                if progress is not None:
                    progress({"event": "batch", "batch": i, "loss": loss.item(), **parts})
            if count == 0:
                raise ValueError("fit_representation: the training factory yielded no batch")

            val_loss = None
            if val is not None:
                model.eval()
                v_total, v_count = 0.0, 0
                with torch.no_grad(), autocast():
                    for x, mask in batches(val):
                        v_total += model.loss(x, mask)[0].item() * len(x)
                        v_count += len(x)
                val_loss = v_total / max(v_count, 1)

            record = {
                "epoch": epoch,
                "train_loss": total / count,
                "val_loss": val_loss,
                "seconds": time.perf_counter() - start,
                "lr": optimiser.param_groups[0]["lr"],
            }
            history.append(record)
            schedule.step()
            if progress is not None:
                progress({"event": "epoch", **record})

            if stopper.step(record["train_loss"] if val_loss is None else val_loss):
                break

    stopper.restore()
    model.eval()
    return history
