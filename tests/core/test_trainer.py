"""LoRSU through transformers' Trainer: both losses, resume, gradient checkpointing, bf16 autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import clip_batches, clip_tokenizer, tiny_clip
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_lorsu import LoRSUConfig
from peft_lorsu.objectives import class_cross_entropy
from peft_lorsu.trainer import ClassPromptCollator, ImageTextCollator, get_lorsu_model, lr_schedule, probe_on_dataset

CLASSES = ["cat", "dog", "car", "tree"]


def paired_dataset(n: int = 8) -> list[dict]:
    samples = []
    for batch in clip_batches(n=n // 4, batch_size=4):
        for i in range(4):
            samples.append({"pixel_values": batch["pixel_values"][i], "input_ids": batch["input_ids"][i]})
    return samples


def labelled_dataset(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "label": i % len(CLASSES)} for i in range(n)]


def args(tmp_path, **kwargs) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kwargs})


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lorsu_" in n}


def contrastive_run(tmp_path, **arg_kwargs):
    model = tiny_clip()
    collator = ImageTextCollator()
    peft_model = get_lorsu_model(
        model, LoRSUConfig(r=4, top_k_heads=2), paired_dataset(), collator, batch_size=4, show_progress=False
    )
    trainer = Trainer(
        model=peft_model,
        args=args(tmp_path, label_names=[], **arg_kwargs),
        train_dataset=paired_dataset(),
        data_collator=collator,
    )
    return peft_model, trainer


def test_contrastive_loss_through_trainer(tmp_path):
    peft_model, trainer = contrastive_run(tmp_path)
    before = adapter_state(peft_model)
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    after = adapter_state(peft_model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, frozen[n]) for n, p in peft_model.named_parameters() if n in frozen)


def test_class_cross_entropy_through_trainer(tmp_path):
    tokenizer = clip_tokenizer()
    model = tiny_clip(real_vocab=True)
    collator = ClassPromptCollator(tokenizer, CLASSES)
    batch = collator(labelled_dataset(4))
    assert batch["input_ids"].shape[0] == len(CLASSES) and batch["labels"].tolist() == [0, 1, 2, 3]
    config = probe_on_dataset(model, LoRSUConfig(r=4), labelled_dataset(), collator, batch_size=4, show_progress=False)
    assert set(config.selected_heads) == {f"vision_model.encoder.layers.{i}.self_attn" for i in range(2)}
    peft_model = get_lorsu_model(model, config, labelled_dataset(), collator)
    trainer = Trainer(
        model=peft_model,
        args=args(tmp_path, remove_unused_columns=False, max_steps=6),
        train_dataset=labelled_dataset(),
        data_collator=collator,
        compute_loss_func=class_cross_entropy,
    )
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss_before = class_cross_entropy(peft_model(**inputs), batch["labels"]).item()
    trainer.train()
    with torch.no_grad():
        loss_after = class_cross_entropy(peft_model(**inputs), batch["labels"]).item()
    assert loss_after < loss_before


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    full_model, full_trainer = contrastive_run(tmp_path / "full", save_strategy="steps", save_steps=2)
    full_trainer.train()
    expected = adapter_state(full_model)

    resumed_model, resumed_trainer = contrastive_run(tmp_path / "resumed")
    assert resumed_model.peft_config["default"].selected_heads == full_model.peft_config["default"].selected_heads
    resumed_trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    got = adapter_state(resumed_model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # the same selection (fc1 entries) ...
    indices = {n: b for n, b in resumed_model.named_buffers() if "lorsu_indices" in n}
    assert indices and all(torch.equal(b, dict(full_model.named_buffers())[n]) for n, b in indices.items())
    # ... and the same optimizer state, which for the sparse fc1 update holds S values per layer, not m x d
    full_state = optimizer_state(full_trainer, full_model)
    resumed_state = optimizer_state(resumed_trainer, resumed_model)
    assert full_state.keys() == resumed_state.keys() == expected.keys()
    num_values = math.floor(0.1 * 64 * 32)
    for name, state in full_state.items():
        assert state.keys() == resumed_state[name].keys() and {"exp_avg", "exp_avg_sq"} <= state.keys()
        if "lorsu_values" in name:
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (num_values,)
        for key, value in state.items():
            torch.testing.assert_close(resumed_state[name][key], value, rtol=0, atol=1e-6, msg=f"{name} {key}")


def test_a_script_resumes_without_probing_again_and_evaluates_without_training_data(tmp_path):
    """The documented recipe: get_lorsu_model(resume_from=checkpoint) instead of a new probe (on other data it would
    pick other heads, and the checkpoint would be refused); evaluation needs only the saved adapter."""
    full_model, full_trainer = contrastive_run(tmp_path / "full", save_strategy="steps", save_steps=2)
    full_trainer.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"

    heads = full_model.peft_config["default"].selected_heads
    configs = (LoRSUConfig(r=4, top_k_heads=2, selection="random", seed=seed) for seed in range(50))
    randoms = (get_peft_model(tiny_clip(), config) for config in configs)
    reprobed = next(m for m in randoms if m.peft_config["default"].selected_heads != heads)  # other heads
    with pytest.raises(ValueError, match=r"is_trainable=True\) instead of probing again"):
        reprobed.load_adapter(str(checkpoint), adapter_name="default")  # what a script that probes again meets

    resumed = get_lorsu_model(tiny_clip(), LoRSUConfig(), None, None, resume_from=checkpoint)
    trainer = Trainer(
        model=resumed, args=args(tmp_path / "resumed", label_names=[]), train_dataset=paired_dataset(),
        data_collator=ImageTextCollator(),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=str(checkpoint))
    expected, got = adapter_state(full_model), adapter_state(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

    final = tmp_path / "final"
    resumed.save_pretrained(final)
    evaluated = PeftModel.from_pretrained(tiny_clip(), final).eval()  # no training data, no probe
    batch = clip_batches(n=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(evaluated(**batch).logits_per_image, resumed.eval()(**batch).logits_per_image)


def optimizer_state(trainer: Trainer, model) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state per adapter parameter name (through accelerate's optimizer wrapper)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return {n: dict(optimizer.state[p]) for n, p in model.named_parameters() if p in optimizer.state}


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain_model, plain = contrastive_run(tmp_path / "plain")
    plain.train()
    # transformers 5.x names the argument activation_checkpointing (gradient_checkpointing is its deprecated alias);
    # 4.x has only gradient_checkpointing, and checkpoints with use_reentrant=True unless told otherwise, which gives
    # no gradient to the parameters inside a layer whose inputs (pixels) need none
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        checkpointing = {"activation_checkpointing": True}
    else:
        checkpointing = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    ckpt_model, ckpt = contrastive_run(tmp_path / "ckpt", **checkpointing)
    ckpt.train()
    assert ckpt_model.base_model.model.vision_model.encoder.gradient_checkpointing
    a, b = adapter_state(plain_model), adapter_state(ckpt_model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_on_cpu(tmp_path):
    peft_model, trainer = contrastive_run(tmp_path, bf16=True)
    before = adapter_state(peft_model)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = adapter_state(peft_model)
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_collator_errors():
    with pytest.raises(ValueError, match="pass a tokenizer"):
        ImageTextCollator()([{"pixel_values": torch.zeros(3, 4, 4), "caption": "a cat"}])
    with pytest.raises(ValueError, match="pass an image_processor"):
        ImageTextCollator()([{"image": object(), "input_ids": [1, 2]}])
    sample = copy.deepcopy(paired_dataset(4)[0])
    batch = ImageTextCollator()([sample])
    assert batch["return_loss"] is True and batch["attention_mask"].shape == batch["input_ids"].shape


def lr_trace(name: str, steps_per_epoch: int, epochs: int, lrs=(1e-3,), **kwargs) -> list[list[float]]:
    """Each parameter group's learning rate at every optimizer step of a run."""
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    optimizer = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    scheduler = lr_schedule(optimizer, name, steps_per_epoch, epochs, **kwargs)
    trace = []
    for _ in range(steps_per_epoch * epochs):
        trace.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return trace


def test_epoch_cosine_is_the_reference_schedule():
    trace = lr_trace("epoch_cosine", steps_per_epoch=4, epochs=5, lrs=(1e-3, 5e-7))
    total = 20
    for step, (lr, small) in enumerate(trace):
        epoch = step // 4
        assert small == pytest.approx(5e-7)  # a rate below the warm-up rate is never raised
        if epoch == 0:
            assert lr == pytest.approx(1e-6)
        else:  # the cosine advances once per epoch over a horizon of every optimizer step
            expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * (epoch - 1) / total))
            assert lr == pytest.approx(expected, rel=1e-12)
    assert trace[4][0] == pytest.approx(1e-3) and 0.94e-3 < trace[-1][0] < 0.95e-3  # near the peak after epoch 1


def test_cosine_and_constant_schedules():
    cosine = [row[0] for row in lr_trace("cosine", steps_per_epoch=2, epochs=2)]
    assert cosine == pytest.approx(
        [1e-3, 1e-3 * (1 + math.cos(math.pi / 4)) / 2, 5e-4, 1e-3 * (1 + math.cos(3 * math.pi / 4)) / 2]
    )
    assert [row[0] for row in lr_trace("constant", 3, 2)] == [1e-3] * 6
    with pytest.raises(ValueError, match=r"name must be one of \('constant', 'cosine', 'epoch_cosine'\), got 'step'"):
        lr_trace("step", 1, 1)
    with pytest.raises(ValueError, match="steps_per_epoch must be an integer >= 1, got 0"):
        lr_trace("cosine", 0, 1)
    with pytest.raises(ValueError, match="warmup_lr must be a number > 0, got 0"):
        lr_trace("epoch_cosine", 1, 1, warmup_lr=0)


def test_epoch_cosine_through_trainer(tmp_path):
    """The schedule by name in a Trainer run: 2 epochs of 2 steps, the first at the warm-up rate."""
    peft_model, _ = contrastive_run(tmp_path)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = lr_schedule(optimizer, "epoch_cosine", steps_per_epoch=2, epochs=2)
    seen = []
    original = optimizer.step

    def step(*a, **k):
        seen.append(optimizer.param_groups[0]["lr"])
        return original(*a, **k)

    optimizer.step = step
    trainer = Trainer(
        model=peft_model,
        args=args(tmp_path, label_names=[], max_steps=-1, num_train_epochs=2),
        train_dataset=paired_dataset(),
        data_collator=ImageTextCollator(),
        optimizers=(optimizer, scheduler),
    )
    assert trainer.train().global_step == 4
    assert seen == pytest.approx([1e-6, 1e-6, 1e-2, 1e-2])
