"""What a person sees in the console during a run: a progress bar whose epoch counter makes sense without an epoch
cap, and none of Lightning's advertising or an upstream deprecation it triggers itself."""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar`, but ``Epoch 14`` instead of ``Epoch 14/-2``
    when the fit has no epoch cap (``trainer.max_epochs: -1``, e.g. a ``max_time`` or ``max_steps`` budget), and
    ``Epoch 14/199`` otherwise."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {current_epoch}"
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            description += f"/{max_epochs - 1}"
        width = len(self.validation_description)
        return f"{description:{width}}" if width > len(description) else description


class _DropTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." lines (an advert printed by every Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def quiet_console() -> None:
    """Keep a run's console to what matters (idempotent): no Lightning adverts, and no FutureWarning about
    ``torch.utils._pytree.LeafSpec`` that Lightning 2.6's own code triggers under torch ≥ 2.10 (nothing a user can
    act on)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)
    # Lightning's model summary cannot size bf16-mixed parameters and says so on every such fit (it sizes them in
    # float32, which is what the parameters are under autocast).
    warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary.*")
