"""Model cards and Hub uploads of the plugin's adapters, through public peft / huggingface_hub calls only.

``PeftModel.save_pretrained`` writes ``README.md`` first and the adapter config last; the plugin's configs write their
section into that card when they are saved (:meth:`peft_lorsu.config.PluginConfig.save_pretrained`), so every save
carries it, and saving again replaces it. The section opens with the one line a reader needs first: load it after
``import peft_lorsu``. ``PeftModel.push_to_hub`` replaces the saved card with the repository's before uploading
(transformers' behaviour); :func:`push_adapter_to_hub` uploads the folder exactly as saved.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

from huggingface_hub import HfApi
from safetensors import safe_open

START, END = "<!-- peft-lorsu:start -->", "<!-- peft-lorsu:end -->"
CARD = "README.md"
TITLES = {
    "LORSU": "LoRSU (Low-Rank Structured Updates)",
    "RLP": "RLP (Re-parameterized Low-rank Prompt)",
    "LORSU_RLP": "LoRSU + RLP (image encoder and text prompt in one adapter)",
}
# Saved adapter tensors that are not trained: RLP's frozen initial context (the index buffers are integer tensors).
FROZEN_TENSORS = ("rlp_P_fr",)


def record_card_info(
    peft_model: Any,
    dataset: str | None = None,
    results: dict[str, float] | None = None,
    adapter_name: str | None = None,
    **extra: Any,
) -> None:
    """Record what an adapter was trained on and how it scored; the next save writes it into the model card.

    The record lives in the adapter's config (field ``card_info``), so it is saved in ``adapter_config.json`` too.

    Args:
        dataset: a description of the training data (e.g. ``"digits, 5 sessions x 5 shots"``).
        results: metric name -> value (e.g. ``{"target accuracy": 0.91}``).
        adapter_name: the adapter to describe; default: the active one.
        extra: any other ``name: value`` lines.
    """
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[name]
    if not hasattr(config, "card_info"):
        raise ValueError(f"adapter {name!r} is a {type(config).__name__}, not a peft-lorsu adapter")
    info = dict(config.card_info or {})
    if dataset is not None:
        info["dataset"] = dataset
    if results:
        info["results"] = {**info.get("results", {}), **results}
    info.update(extra)
    config.card_info = info


def trainable_count(weights_path: str) -> int:
    """Trained entries of a saved adapter: its floating-point tensors other than RLP's frozen initial context."""
    total = 0
    with safe_open(weights_path, framework="pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            if part.get_dtype().startswith(("F", "BF")) and not any(t in key for t in FROZEN_TENSORS):
                total += math.prod(part.get_shape())
    return total


def lorsu_lines(config: Any) -> list[str]:
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


def rlp_lines(config: Any) -> list[str]:
    return [
        f"- mode: {config.mode}; context length `n_ctx` = {config.n_ctx}; rank = {config.rank}; "
        f"dropout = {config.dropout}",
        f"- init text: {config.init_text!r}",
    ]


def card_section(config: Any, trainable: int | None) -> str:
    """The Markdown section describing one adapter of the plugin, from its config and its trainable count."""
    method = getattr(config.peft_type, "value", config.peft_type)
    base = config.base_model_name_or_path or "(not recorded)"
    out = [
        START,
        "## peft-lorsu adapter",
        "",
        f"**Load it after `import peft_lorsu`** (`pip install peft-lorsu`), which registers the {method} method "
        "with peft; without that import peft stops with `KeyError`:",
        "",
        "```python",
        "import peft_lorsu",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, adapter_path)",
        "```",
        "",
        f"Method: {TITLES.get(method, method)}. Base model: `{base}`.",
    ]
    if trainable is not None:
        out.append(f"- trainable parameters: {trainable:,}")
    if method == "LORSU_RLP":
        out += lorsu_lines(config.lorsu) + rlp_lines(config.rlp)
    else:
        out += lorsu_lines(config) if method == "LORSU" else rlp_lines(config)
    info = getattr(config, "card_info", None) or {}
    if info:
        out += ["", "### Training data and results", ""]
        if "dataset" in info:
            out.append(f"- data: {info['dataset']}")
        for metric, value in info.get("results", {}).items():
            out.append(f"- {metric}: {value:.4f}" if isinstance(value, float) else f"- {metric}: {value}")
        out += [f"- {key}: {value}" for key, value in info.items() if key not in ("dataset", "results")]
    out.append(END)
    return "\n".join(out)


def write_card_section(folder: str, section: str) -> None:
    """Insert ``section`` into ``folder/README.md`` right after its metadata block, or replace the previous one."""
    path = os.path.join(folder, CARD)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if START in text and END in text:
        head, _, rest = text.partition(START)
        text = head + section + rest.partition(END)[2]
    else:
        front = ""
        if text.startswith("---\n") and "\n---\n" in text[4:]:
            end = text.index("\n---\n", 4) + len("\n---\n")
            front, text = text[:end], text[end:]
        text = f"{front}\n{section}\n\n{text.lstrip()}"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def push_adapter_to_hub(
    peft_model: Any,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload peft-lorsu adapter",
    api: Any = None,
) -> str:
    """Save ``peft_model``'s adapters (card section included) and upload the folder as saved to ``repo_id``.

    Unlike ``peft_model.push_to_hub``, which replaces the saved card with the repository's, the uploaded card keeps
    the peft-lorsu section. Only safetensors weights are uploaded.

    Args:
        api: a ``huggingface_hub.HfApi`` (default: a new one with ``token``).

    Returns:
        The URL of the commit.
    """
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, safe_serialization=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))
