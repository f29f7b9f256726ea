"""Model cards for LoRSU / RLP adapters.

``PeftModel.save_pretrained`` (and so ``push_to_hub``, which saves before uploading) writes a ``README.md`` model card.
After ``import peft_lorsu`` the card of a LoRSU or RLP adapter also gets a section stating the method, the base
model, the selection (heads per layer, sparsity), the trainable parameters and, when the user recorded them with
:func:`record_card_info`, the training data and evaluation figures. The section sits between two HTML comments, so
saving again replaces it instead of appending a copy.
"""

from __future__ import annotations

import functools
import os
from typing import Any

START, END = "<!-- peft-lorsu:start -->", "<!-- peft-lorsu:end -->"
_INFO_ATTR = "_peft_lorsu_card_info"


def record_card_info(
    peft_model: Any, dataset: str | None = None, results: dict[str, float] | None = None, **extra: Any
) -> None:
    """Remember what the adapter was trained on and how it scored, for the next model card.

    Args:
        dataset: a description of the training data (e.g. ``"digits, 5 sessions x 5 shots"``).
        results: metric name -> value (e.g. ``{"target accuracy": 0.91}``).
        extra: any other ``name: value`` lines.
    """
    info = getattr(peft_model, _INFO_ATTR, {})
    if dataset is not None:
        info["dataset"] = dataset
    if results:
        info.setdefault("results", {}).update(results)
    info.update(extra)
    setattr(peft_model, _INFO_ATTR, info)


def _lorsu_lines(config: Any) -> list[str]:
    lines = [
        f"- rank `r` = {config.r}, `lora_alpha` = {config.lora_alpha}, `top_k_heads` = {config.top_k_heads}, "
        f"`sparsity` = {config.sparsity}",
        f"- tower: {config.tower}; selection: {config.selection}; shared q/k/v factor: {config.share_qkv_factor}; "
        f"bias deltas: {config.train_biases}; projection update: {config.adapt_projection}",
    ]
    if config.selected_heads:
        lines += ["", "| attention block | selected heads |", "| --- | --- |"]
        lines += [f"| `{block}` | {heads} |" for block, heads in config.selected_heads.items()]
    return lines


def _rlp_lines(config: Any) -> list[str]:
    return [
        f"- mode: {config.mode}; context length `n_ctx` = {config.n_ctx}; rank = {config.rank}; "
        f"dropout = {config.dropout}",
        f"- init text: {config.init_text!r}",
    ]


def card_section(peft_model: Any) -> str:
    """The Markdown section describing every LoRSU / RLP adapter of ``peft_model``."""
    out = [START, "## peft-lorsu adapter", ""]
    base = getattr(peft_model.get_base_model(), "name_or_path", "") or "(not recorded)"
    out.append(f"Base model: `{base}`. Load with `import peft_lorsu` then `PeftModel.from_pretrained(base, path)`.")
    for name, config in peft_model.peft_config.items():
        method = getattr(config.peft_type, "value", config.peft_type)
        if method not in ("LORSU", "RLP"):
            continue
        n_params = _trainable(peft_model, name)
        title = (
            "LoRSU (Low-Rank Structured Updates)" if method == "LORSU" else "RLP (Re-parameterized Low-rank Prompt)"
        )
        out += ["", f"### Adapter `{name}`: {title}", "", f"- trainable parameters: {n_params:,}"]
        out += _lorsu_lines(config) if method == "LORSU" else _rlp_lines(config)
    info = getattr(peft_model, _INFO_ATTR, {})
    if info:
        out += ["", "### Training data and results", ""]
        if "dataset" in info:
            out.append(f"- data: {info['dataset']}")
        for metric, value in info.get("results", {}).items():
            out.append(f"- {metric}: {value:.4f}" if isinstance(value, float) else f"- {metric}: {value}")
        out += [f"- {key}: {value}" for key, value in info.items() if key not in ("dataset", "results")]
    out.append(END)
    return "\n".join(out)


def _trainable(peft_model: Any, adapter: str) -> int:
    """Parameters of ``adapter`` (trainable when active), counted once even when shared."""
    seen, total = set(), 0
    for name, param in peft_model.named_parameters():
        if f".{adapter}" in name and id(param) not in seen and ("lorsu_" in name or "rlp_" in name):
            seen.add(id(param))
            total += param.numel()
    return total


def write_card_section(peft_model: Any, output_dir: str) -> None:
    """Insert or replace the peft-lorsu section of ``output_dir/README.md``."""
    path = os.path.join(output_dir, "README.md")
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    section = card_section(peft_model)
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _has_plugin_adapter(peft_model: Any) -> bool:
    return any(getattr(c.peft_type, "value", c.peft_type) in ("LORSU", "RLP") for c in peft_model.peft_config.values())


def install_model_card_hook() -> None:
    """Add the peft-lorsu section to the cards PEFT writes (idempotent).

    Two places write a card: ``PeftModel.create_or_update_model_card`` (called by ``save_pretrained``) and
    ``push_to_hub``, which saves, then replaces ``README.md`` with the card of the Hub repository before uploading
    the folder through ``_upload_modified_files``. Both are wrapped; adapters of other methods are left alone.
    """
    from peft import PeftModel

    def wrap(name: str, folder_arg: int):
        original = getattr(PeftModel, name)
        if getattr(original, "_peft_lorsu", False):
            return

        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if name == "_upload_modified_files" and _has_plugin_adapter(self):
                write_card_section(self, args[folder_arg] if len(args) > folder_arg else kwargs["working_dir"])
            result = original(self, *args, **kwargs)
            if name == "create_or_update_model_card" and _has_plugin_adapter(self):
                write_card_section(self, args[folder_arg] if len(args) > folder_arg else kwargs["output_dir"])
            return result

        wrapper._peft_lorsu = True
        setattr(PeftModel, name, wrapper)

    wrap("create_or_update_model_card", 0)
    wrap("_upload_modified_files", 0)
