"""Datasets generated on first use (digit scenes, digit pairs): one folder per parameter set,
written so that an interrupted or concurrent generation never leaves a folder that looks done."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

from normlab.errors import ConfigError

# Written last into a generated folder: its presence means the folder is complete.
COMPLETE_MARKER = "params.json"


def params_tag(params: dict[str, Any]) -> str:
    """Short stable hash of the generation parameters: the name of their folder."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, COMPLETE_MARKER))


@contextlib.contextmanager
def atomic_folder(directory: str, params: dict[str, Any]) -> Iterator[str]:
    """Yield a temporary sibling of ``directory`` to fill; when the block succeeds, write
    ``params`` as the completion marker and rename the folder into place. On failure (or
    interruption) the temporary folder is removed and ``directory`` never appears."""
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(tmp)
        yield tmp
        with open(os.path.join(tmp, COMPLETE_MARKER), "w") as f:
            json.dump(params, f, indent=2, sort_keys=True)
        try:
            os.rename(tmp, directory)
        except OSError:
            # Another process finished the same folder first; its content is identical.
            if not is_complete(directory):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


class GeneratedData:
    """Mixin for data modules whose files are generated into ``root`` (a folder named by
    :func:`params_tag` of ``generation_params``): generates in ``prepare_data`` (rank 0 under
    Lightning) and, if still missing, in ``setup`` so that ``dm.setup()`` works without a Trainer.
    Subclasses implement :meth:`generate`."""

    root: str
    generation_params: dict[str, Any]
    # The folder given as ``data.root``, and the tag naming these parameters' folder under it.
    data_root: str
    tag: str

    def generated_root(
        self, root: str | os.PathLike[str], dataset: str, params: dict[str, Any]
    ) -> str:
        """Keep ``params`` as this module's generation parameters and return the folder their
        files go to, ``<root>/<dataset>/<tag>`` (the data module's ``root``)."""
        self.generation_params = params
        self.data_root = os.path.expanduser(os.fspath(root))
        self.tag = params_tag(params)
        return os.path.join(self.data_root, dataset, self.tag)

    def generate(self, directory: str, params: dict[str, Any]) -> None:
        raise NotImplementedError

    @property
    def is_generated(self) -> bool:
        return is_complete(self.root)

    def prepare_data(self) -> None:
        if self.is_generated:
            return
        if os.path.exists(self.root):
            raise ConfigError(
                f"data.root: {self.root} exists but lacks {COMPLETE_MARKER} (not written by this "
                "generator, or edited); delete it to regenerate"
            )
        self.generate(self.root, self.generation_params)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # a no-op once generated
        super().setup(stage)  # type: ignore[misc]
