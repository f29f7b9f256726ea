"""The continual few-shot runner: session sampling, every method end to end, outputs, stacked adapters."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import clip_tokenizer, tiny_clip

from peft_lorsu.app.continual import METHODS, ContinualConfig, ContinualRunner, session_indices
from peft_lorsu.app.sessions import ClassificationSet

CLASSES = ["zero", "one", "two", "three"]


def classification_set(n_per_class: int, seed: int, names=CLASSES) -> ClassificationSet:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(names)).repeat_interleave(n_per_class)
    patterns = torch.randn(len(names), 3, 16, 16, generator=torch.Generator().manual_seed(42))
    pixels = patterns[labels] + 0.3 * torch.randn(len(labels), 3, 16, 16, generator=g)
    return ClassificationSet(pixels, labels, list(names))


def runner(method: str, **kwargs) -> ContinualRunner:
    config = ContinualConfig(
        method=method, sessions=2, shots=2, epochs=2, lr=1e-2, batch_size=4, r=4, lora_alpha=4, **kwargs
    )
    return runner_for(config)


def runner_for(config: ContinualConfig) -> ContinualRunner:
    """A runner of ``config`` on a tiny CLIP: 4 target classes (6 train / 3 test images each), 2 control classes."""
    controls = {"control": classification_set(3, 2, names=["cat", "dog"])}
    return ContinualRunner(
        tiny_clip(real_vocab=True),
        clip_tokenizer(),
        classification_set(6, 0),
        classification_set(3, 1),
        controls,
        config,
    )


def test_session_indices_are_disjoint_and_few_shot():
    data = classification_set(6, 0)
    sessions = session_indices(data, ContinualConfig(sessions=2, shots=3))
    assert [len(s) for s in sessions] == [6, 6]
    assert not set(sessions[0].tolist()) & set(sessions[1].tolist())
    assert set(data.labels[sessions[0]].tolist()) == {0, 2} and set(data.labels[sessions[1]].tolist()) == {1, 3}
    mixed = session_indices(data, ContinualConfig(sessions=2, shots=3, disjoint_classes=False))
    assert set(data.labels[mixed[0]].tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="class 'zero' has 6 images, needs 9"):
        session_indices(data, ContinualConfig(sessions=1, shots=9))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_two_sessions(method, tmp_path):
    run = runner(method)
    text_before = copy.deepcopy(run.model.text_model.state_dict())
    result = run.run(show_progress=False)
    expected_rows = 1 if method == "zero_shot" else 3
    assert len(result.rows) == expected_rows and all(len(r) == 2 for r in result.rows)
    assert all(0.0 <= v <= 1.0 for row in result.rows for v in row)
    if method != "zero_shot":
        assert len(result.trainable_params) == 2 and all(n > 0 for n in result.trainable_params)
    if method in ("lorsu", "lorsu_random", "lora", "full", "spu"):
        final_text = {k.replace(".base_layer", ""): v for k, v in run.final_model.text_model.state_dict().items()}
        assert all(torch.equal(final_text[k], v) for k, v in text_before.items()), "text tower changed"
    paths = result.save(tmp_path)
    saved = json.loads(paths[0].read_text())
    assert saved["columns"] == ["target", "control"] and len(saved["rows"]) == expected_rows
    assert saved["target_improvement"] == pytest.approx(result.rows[-1][0] - result.rows[0][0])
    assert paths[1].read_text().splitlines()[0] == "session,target,control"
    assert paths[2].stat().st_size > 1000


def test_lorsu_learns_the_target_and_full_changes_vision_weights():
    run = runner("lorsu", loss="class_ce")
    run.config.epochs = 10
    lorsu = run.run(show_progress=False)
    assert lorsu.rows[-1][0] >= lorsu.rows[0][0] + 0.25  # 0.25 -> 0.75 on this seed
    assert lorsu.trainable_params[0] < runner("full").run(show_progress=False).trainable_params[0]


def test_stacked_adapters_keep_one_per_session():
    run = runner("lorsu", merge=False)
    result = run.run(show_progress=False)
    model = run.final_model
    assert list(model.peft_config) == ["session_1", "session_2"]
    assert model.base_model.active_adapters == ["session_1", "session_2"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("session_2" in n for n in trainable)
    assert result.adapter_params == sum(result.trainable_params)


def test_config_errors():
    with pytest.raises(ValueError, match=r"method must be one of .*got 'adam'"):
        ContinualConfig(method="adam")
    with pytest.raises(ValueError, match="ContinualConfig.shots must be an integer >= 1"):
        ContinualConfig(shots=0)
    with pytest.raises(ValueError, match="loss must be one of"):
        ContinualConfig(loss="mse")
    with pytest.raises(ValueError, match=r"prompt_dropout must be None or in \[0, 1\), got 1.0"):
        ContinualConfig(method="rlp", prompt_dropout=1.0)
    for method in ("coop", "lorsu"):
        with pytest.raises(ValueError, match=f"prompt_dropout=0.5 needs RLP's low-rank branch .* method '{method}'"):
            ContinualConfig(method=method, prompt_dropout=0.5)
    with pytest.raises(ValueError, match=r"prompt_lr must be None or > 0 and is only used by method 'lorsu_rlp'"):
        ContinualConfig(method="lorsu", prompt_lr=1e-2)
    with pytest.raises(ValueError, match="got prompt_lr=0.0 with method 'lorsu_rlp'"):
        ContinualConfig(method="lorsu_rlp", prompt_lr=0.0)
    with pytest.raises(ValueError, match="merge=False is not supported by method 'lorsu_rlp'"):
        ContinualConfig(method="lorsu_rlp", merge=False)


def test_prompt_dropout_reaches_the_rlp_adapter():
    run = runner("rlp", prompt_dropout=0.25)
    run.run(show_progress=False)
    assert run.final_model.peft_config["default"].dropout == 0.25


def test_rollback_undoes_sessions_and_memory_is_reported():
    run = runner("lorsu", merge=False)
    result = run.run(show_progress=False)
    # session 1's adapter: fp32 trainable tensors plus int64 index buffers (fc1 entries, q/k/v rows of 2 heads)
    fc1_entries, head_rows = 2 * int(0.1 * 64 * 32), 2 * 3 * 2 * 8
    assert result.adapter_bytes[0] == 4 * result.trainable_params[0] + 8 * (fc1_entries + head_rows)
    assert len(result.adapter_bytes) == 2 and result.final_adapter_bytes == sum(result.adapter_bytes)
    assert json.loads(json.dumps(result.to_dict()))["adapter_bytes"] == result.adapter_bytes

    model = run.rollback(2)
    assert list(model.peft_config) == ["session_1"] and model.base_model.active_adapters == ["session_1"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "session_1" in n for n, p in model.named_parameters() if p.requires_grad
    )
    assert run.evaluate(model) == result.rows[1]
    base = run.rollback(1)
    assert type(base).__name__ == "CLIPModel" and run.evaluate(base) == result.rows[0]


def test_merged_sessions_report_memory_but_cannot_roll_back():
    run = runner("spu", merge=True)
    with pytest.raises(ValueError, match="rollback: no adapters to roll back; call run"):
        runner("lorsu", merge=False).rollback(1)
    result = run.run(show_progress=False)
    assert len(result.adapter_bytes) == 2 and all(b > 0 for b in result.adapter_bytes)
    assert result.final_adapter_bytes == 0
    with pytest.raises(ValueError, match=r"rollback needs one adapter per session: .* merge=True, method='spu'"):
        run.rollback(1)
    stacked = runner("lora", merge=False)
    stacked.run(show_progress=False)
    with pytest.raises(ValueError, match=r"session must be in 1..2, got 3"):
        stacked.rollback(3)


def test_lorsu_rlp_trains_both_towers_and_folds_the_prompt_each_session():
    run = runner("lorsu_rlp", loss="contrastive")  # the prompt needs class prompts: the runner uses class_ce
    assert run.loss == "class_ce"
    base = copy.deepcopy(run.model)
    result = run.run(show_progress=False)
    final = run.final_model
    assert type(final) is type(base), "each session is merged and folded: a plain CLIPModel comes out"
    # the image tower changed (LoRSU merged), the text tower only in the position embeddings of the context tokens
    # (positions 1..n_ctx after BOS: where RLP's prompt was folded)
    n_ctx = len(run.tokenizer(run.config.init_text, add_special_tokens=False)["input_ids"])
    pos = final.text_model.embeddings.position_embedding.weight

    def base_pos():
        return base.text_model.embeddings.position_embedding.weight

    changed = (pos - base.text_model.embeddings.position_embedding.weight).abs().amax(dim=1) > 0
    assert changed.nonzero().flatten().tolist() == list(range(1, 1 + n_ctx))
    text_rest = {k: v for k, v in final.text_model.state_dict().items() if "position_embedding" not in k}
    assert all(torch.equal(v, base.text_model.state_dict()[k]) for k, v in text_rest.items())
    assert not torch.equal(
        final.vision_model.encoder.layers[0].mlp.fc1.weight, base.vision_model.encoder.layers[0].mlp.fc1.weight
    )
    # trainable parameters per session: LoRSU's (same config and probe as method "lorsu") plus RLP's n_ctx * r + r * d
    d = base.config.text_config.hidden_size
    lorsu_only = runner("lorsu", loss="class_ce").run(show_progress=False)
    assert result.trainable_params == [n + n_ctx + d for n in lorsu_only.trainable_params]
    assert result.final_adapter_bytes == 0 and all(b > 0 for b in result.adapter_bytes)
    # a larger prompt lr moves the folded prompt further; the image side is trained at lr either way
    faster = runner("lorsu_rlp", prompt_lr=0.1)
    faster.run(show_progress=False)
    moved = (faster.final_model.text_model.embeddings.position_embedding.weight - base_pos()).abs().max()
    assert moved > 3 * (pos - base_pos()).abs().max()


def test_eval_batches_cover_the_set_in_order():
    data = classification_set(3, 0)  # 12 images
    batches = data.eval_batches(size=5)
    assert [len(b["labels"]) for b in batches] == [5, 5, 2]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), data.labels)
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), data.pixel_values)
