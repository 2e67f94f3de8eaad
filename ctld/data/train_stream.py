"""The trainer's stream of batches for one rank (ctld/train.py): a resampled patch loader reopened at checkpoints."""

from __future__ import annotations

from ctld.data.loader import make_patch_loader


class TrainStream:
    """The trainer's batches for one rank: a resampled patch loader reopened, keyed by the step, at every
    checkpoint and when a pass ends, so a run resumed from step N sees what an uninterrupted run sees after N."""

    def __init__(self, urls: list[str], cfg, accelerator, latent: bool = False):
        if not urls:
            raise ValueError(
                f"no training shards found (data.shards_dir={cfg.data.shards_dir!r}, data.train_urls="
                f"{cfg.data.train_urls!r}); build them with `ctld-shards build`"
            )
        self.urls, self.cfg, self.accelerator, self.latent = urls, cfg, accelerator, latent
        self._iterator = None
        self._opened_at = -1

    def open(self, step: int) -> None:
        if step == self._opened_at:
            return
        loader = make_patch_loader(
            self.urls,
            self.cfg.data,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
            seed=self.cfg.train.seed,  # combined with data.seed inside the loader
            resampled=True,
            epoch=step,
            latent=self.latent,
        )
        self._iterator, self._opened_at = iter(loader), step

    def next(self, step: int) -> dict:
        try:
            return next(self._iterator)
        except StopIteration:
            self._opened_at = -1
            self.open(step)
            try:
                return next(self._iterator)
            except StopIteration:
                raise RuntimeError(
                    f"the training loader yields no batches (shards {self.urls[:3]}...): check data.batch_size and "
                    "data.samples_per_epoch, and that the shards hold volumes of at least one patch"
                ) from None
