"""The training order: a function of the seed and the epoch alone.

:class:`EpochSeededSampler` draws each epoch's permutation and a seed per sample,
:class:`SeededSamples` loads each sample under its seed (so its augmentation does not depend on
the workers or on a resume), and :class:`EpochSeededLoader` tells Lightning's fit loop how to
resume it. :class:`~normlab.data.datamodule.SplitDataModule` puts the three together.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from normlab.ranges import ArgumentError


class EpochSeededSampler(RandomSampler):
    """Shuffles as ``DistributedSampler(shuffle=True, seed=seed)`` with a single replica: epoch
    ``e`` is ``randperm(n)`` drawn from ``seed + e``. Under DDP Lightning replaces it (it is a
    RandomSampler) by a DistributedSampler seeded with the run's seed, so with the same seed a
    run on k processes sees, step for step, the same samples as a run on one process with a k
    times larger batch.

    Each index comes with a seed for that sample's augmentation (see :class:`SeededSamples`),
    drawn from the same generator: what a sample looks like depends on the seed, the epoch and
    its position only, not on the global RNG, the number of workers or a resume.
    :meth:`skip_next` makes the next pass start further in (resuming mid-epoch)."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Leave out the first ``samples`` of the next pass (those seen before an interruption)."""
        self._skip = samples

    def __len__(self) -> int:
        return len(self.data_source) - self._skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        n = len(self.data_source)
        order = torch.randperm(n, generator=generator).tolist()
        sample_seeds = torch.randint(2**62, (n,), generator=generator).tolist()
        skip, self._skip = self._skip, 0
        yield from zip(order[skip:], sample_seeds[skip:], strict=True)


class EpochSeededLoader(DataLoader):
    """The training loader. Its order is a function of the sampler's seed and epoch, which the
    checkpoint's loop state holds; :class:`~normlab.callbacks.ExactResume` makes the sampler skip
    the batches an interrupted epoch had trained. ``state_dict``/``load_state_dict`` say so to
    Lightning's fit loop (which otherwise warns on every mid-epoch resume that the loader is not
    resumable) and check that a resumed run shuffles with the seed it started with."""

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler
        return {"seed": sampler.seed} if isinstance(sampler, EpochSeededSampler) else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        if (
            isinstance(sampler, EpochSeededSampler)
            and state.get("seed", sampler.seed) != sampler.seed
        ):
            raise ArgumentError(
                "seed",
                sampler.seed,
                f"{{key}}={sampler.seed}, but the checkpoint's run shuffled its data with seed "
                f"{state['seed']}: resume with seed={state['seed']} (or resume_mode=weights)",
            )


class SeededSamples(Dataset):
    """``dataset[index]`` for ``(index, seed)`` keys (from :class:`EpochSeededSampler`), with the
    torch RNG seeded by ``seed`` while the sample is loaded and transformed, then restored; plain
    ``int`` keys (DDP's DistributedSampler) read the sample with the global RNG as usual."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, seed = key
        # Only the CPU generator: torch.manual_seed also seeds every accelerator, and with
        # fork_rng's bookkeeping cost ~0.8 ms a sample (a minute per Fashion-MNIST epoch) where
        # this costs ~10 µs. The CPU stream drawn is the same.
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)
