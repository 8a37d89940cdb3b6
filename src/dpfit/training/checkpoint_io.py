"""Lightning's checkpoint reading and writing, made safe (the trainer's ``plugins``).

- Reading (``trainer.fit(ckpt_path=...)``): :func:`dpfit.io.checkpoint.load_checkpoint`, i.e.
  ``weights_only=True`` with dpfit's allowlist; nothing in the file runs.
- Writing (ModelCheckpoint, the preemption save): a temporary file beside the target, renamed over it
  (:func:`dpfit.io.checkpoint.write_checkpoint`): a full disk or a file-size limit leaves the previous
  checkpoint intact and is reported naming the file.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from dpfit.io.checkpoint import load_checkpoint, write_checkpoint


class SafeCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` reading safely and writing atomically (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        return load_checkpoint(path)  # on CPU: Lightning copies the states onto the model's device
