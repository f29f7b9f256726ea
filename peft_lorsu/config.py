"""The base of the plugin's configs: what every LoRSU / RLP / joint config records when it is saved and loaded."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME

from .hub import CARD, card_section, trainable_count, write_card_section

_SHA256 = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PluginConfig(PeftConfig):
    """A ``PeftConfig`` that ties itself to the weights saved next to it and describes itself in the model card.

    - ``save_pretrained`` records the SHA-256 of the ``adapter_model.safetensors`` already in the folder (peft writes
      the weights, then the config) and writes the adapter's section into the folder's ``README.md``. A folder whose
      weights come from another save (one interrupted between the two files) or were edited no longer matches, and
      :mod:`peft_lorsu.loading` refuses it before the base model is touched.
    - ``from_pretrained`` remembers the local folder it read (attribute ``loaded_from``, never saved), so the
      injection that follows (``PeftModel.from_pretrained``) can check that folder's weights first.

    Args:
        weights_sha256 (`str`, *optional*):
            Written by ``save_pretrained``: the SHA-256 of the weights saved with this config.
        card_info (`dict`, *optional*):
            What the adapter was trained on and how it scored (:func:`peft_lorsu.record_card_info`); shown in the card.
    """

    weights_sha256: str | None = field(
        default=None, metadata={"help": "Written on save: SHA-256 of the adapter weights saved with this config."}
    )
    card_info: dict[str, Any] | None = field(
        default=None, metadata={"help": "Training data and results for the model card (record_card_info)."}
    )

    def check_plugin_fields(self) -> None:
        """Validate the fields this base adds (called by each config's validation)."""
        name = type(self).__name__
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and _SHA256.fullmatch(self.weights_sha256)
        ):
            raise ValueError(
                f"{name}.weights_sha256 must be None or 64 lower-case hex digits (a SHA-256), "
                f"got {self.weights_sha256!r}"
            )
        if self.card_info is not None and not isinstance(self.card_info, dict):
            raise ValueError(f"{name}.card_info must be None or a dict, got {type(self.card_info).__name__}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(folder, subfolder) if subfolder else folder
        if isinstance(config, PluginConfig) and os.path.isdir(folder):
            # (folder, the fields as read): the check is skipped if the config is edited before injection
            config.loaded_from = (os.path.abspath(folder), config.fields_as_read())
        return config

    def fields_as_read(self) -> dict:
        """The config's fields except ``inference_mode`` (which ``from_pretrained`` sets after reading)."""
        fields = self.to_dict()
        fields.pop("inference_mode", None)
        return fields

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        weights = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        has_weights = os.path.isfile(weights)
        self.weights_sha256 = file_sha256(weights) if has_weights else None
        super().save_pretrained(save_directory, **kwargs)
        if os.path.isfile(os.path.join(save_directory, CARD)):
            write_card_section(
                os.fspath(save_directory), card_section(self, trainable_count(weights) if has_weights else None)
            )
