"""LoRSU-Ppl: the VLM variant's config, the VQA collator's labels, training scope inside LLaVA, the example script."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_lorsu import probe_lorsu
from peft_lorsu.app.tiny_llava import color_vqa, tiny_llava, tiny_llava_processor
from peft_lorsu.lorsu import VQACollator, lorsu_ppl_config
from peft_lorsu.lorsu.ppl import IGNORE_INDEX

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lorsu_ppl_llava.py"


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_processor()


def test_ppl_config_is_the_papers_vlm_variant():
    config = lorsu_ppl_config(r=8, top_k_heads=1)
    assert (config.r, config.top_k_heads, config.tower) == (8, 1, "vision")
    assert not config.share_qkv_factor and config.resolved_init == "lora"
    assert not config.adapt_projection and config.train_biases == ["mlp"]  # fc1's bias, not q/k/v's (authors' code)
    assert config.adapt_attention and config.adapt_mlp
    assert lorsu_ppl_config(train_biases=True).train_biases is True  # every field can still be overridden


def test_collator_labels_score_only_the_answer(processor):
    tokenizer = processor.tokenizer
    examples = color_vqa(2)
    examples[1] = {**examples[1], "answer": "a photo of a square"}
    batch = VQACollator(processor)(examples)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    assert (ids == image_token).sum(1).tolist() == [4, 4]  # (16 / 8)^2 patches, class token dropped
    for row, answer in enumerate(["red", "a photo of a square"]):
        scored = labels[row][labels[row] != IGNORE_INDEX]
        assert scored.tolist() == tokenizer(f" {answer}</s>", add_special_tokens=False)["input_ids"]
        start = int(mask[row].sum()) - len(scored)
        assert torch.equal(ids[row, start : int(mask[row].sum())], scored)  # the answer ends the sequence
        assert tokenizer.decode(ids[row, :start]).endswith("ASSISTANT :")
    assert mask[0].sum() < mask[1].sum() and (labels[0][mask[0] == 0] == IGNORE_INDEX).all()
    assert (ids[0][mask[0] == 0] == tokenizer.pad_token_id).all()


def test_collator_errors_and_max_length(processor):
    example = color_vqa(1)[0]
    long = {**example, "answer": "a photo of a red square"}
    prompt_tokens = VQACollator(processor)([example])["labels"].eq(IGNORE_INDEX).sum().item()
    cut = VQACollator(processor, max_length=prompt_tokens + 2)([long])
    assert (
        cut["input_ids"].shape[1] == prompt_tokens + 2
        and cut["labels"][0, -2:].tolist() == cut["input_ids"][0, -2:].tolist()
    )
    with pytest.raises(ValueError, match=r"max_length=5 leaves no room for the answer"):
        VQACollator(processor, max_length=5)([example])
    with pytest.raises(KeyError, match=r"lacks \['answer'\]"):
        VQACollator(processor)([{"image": example["image"], "question": "what color is the square ?"}])
    broken = tiny_llava_processor()
    broken.chat_template = (
        "{% for m in messages %}{{ m['role'] }}{% endfor %}{% if add_generation_prompt %}!{% endif %}"
    )
    with pytest.raises(ValueError, match="generation prompt is not a prefix"):
        VQACollator(broken)([example])


def test_ppl_trains_only_the_read_vision_layers(processor):
    model = tiny_llava(processor, vision_layers=3)
    collate, data = VQACollator(processor), color_vqa(8)
    batches = [collate(data[:4]), collate(data[4:])]
    config = probe_lorsu(model, lorsu_ppl_config(r=4, top_k_heads=1, sparsity=0.1), batches, show_progress=False)
    # transformers >= 5.6 flattens CLIPVisionModel (no .vision_model inside the tower)
    tower = "model.vision_tower." + ("vision_model." if hasattr(model.model.vision_tower, "vision_model") else "")
    assert sorted(config.selected_heads) == [f"{tower}encoder.layers.{i}.self_attn" for i in range(2)]
    peft_model = get_peft_model(model, config)
    d, d_h, r, m = 32, 8, 4, 64
    # per read layer: q, k, v each own U (k*d_h x r) and V (r x d); fc1 trains floor(p * m * d) entries and its bias
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * (3 * (d_h * r + r * d) + math.floor(0.1 * m * d) + m)
    biases = [n for n, p in peft_model.named_parameters() if ".lorsu_bias." in n and p.requires_grad]
    assert len(biases) == 2 and all(".mlp.fc1." in n for n in biases)
    peft_model.train()
    peft_model(**batches[0]).loss.backward()
    with_grad = [n for n, p in peft_model.named_parameters() if p.grad is not None]
    assert with_grad and all(".lorsu_" in n and ".vision_tower." in n for n in with_grad)
    frozen = [p for n, p in peft_model.named_parameters() if "language_model" in n or "multi_modal_projector" in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_example_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("lorsu_ppl_llava", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lorsu_ppl_llava"] = module
    spec.loader.exec_module(module)
    summary = module.main(["--dry_run", "--output_dir", str(tmp_path)])
    assert summary["adapted_layers"] == 2 and summary["reload_identical"] and summary["merge_max_abs_diff"] < 1e-5
    assert summary["answer_loss_after"] < summary["answer_loss_before"]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORSU" and saved["share_qkv_factor"] is False and saved["adapt_projection"] is False
