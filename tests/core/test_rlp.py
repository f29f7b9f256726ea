"""RLP tuner: parameter counts, init, gradients, dropout, save/load, merge, adapters, Trainer, learning, validation."""

from __future__ import annotations

import importlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftConfig, PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING  # noqa: E402
from peft.utils.peft_types import PeftType  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    Trainer,
    TrainingArguments,
)

import peft_lorsu.rlp  # noqa: E402
from peft_lorsu.compat import pooled_features
from peft_lorsu.objectives import ZeroShotClassifier, class_cross_entropy, zero_shot_accuracy  # noqa: E402
from peft_lorsu.rlp import RLPConfig, RLPModel, RLPTextEmbedding  # noqa: E402

VOCAB, BOS, EOS, DOT = 50, 0, 1, 7
CTX = [2, 3, 4, 2]  # "a photo of a" in a made-up vocabulary
OTHER_CTX = [5, 6]  # a second init text
CLASS_IDS = [10, 11, 12, 13]


def tiny_clip(text_width: int = 64, seed: int = 0, heads: int = 4, max_positions: int = 16) -> CLIPModel:
    """Random CLIP: text tower of width `text_width` x 2 layers, vision 32 x 1 on 16 px images; eval mode."""
    torch.manual_seed(seed)
    text = dict(
        hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2, num_attention_heads=heads,
        vocab_size=VOCAB, max_position_embeddings=max_positions, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=EOS,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)  # fmt: skip
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


def prompts(ctx: list[int] = CTX, classes: list[int] = CLASS_IDS) -> torch.Tensor:
    """`(C, 3 + len(ctx))` ids of ``[SOS] ctx class . [EOS]``."""
    return torch.tensor([[BOS, *ctx, c, DOT, EOS] for c in classes])


def text_features(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return pooled_features(model.get_text_features(input_ids=ids))


def rlp_layer(peft_model: nn.Module) -> RLPTextEmbedding:
    layers = [m for m in peft_model.modules() if isinstance(m, RLPTextEmbedding)]
    assert len(layers) == 1
    return layers[0]


def randomize_adapter(peft_model: nn.Module, seed: int = 1) -> None:
    """Give every trainable RLP tensor a non-zero value, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "rlp_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def synthetic_images(num_classes: int = 4, per_class: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(N, 3, 16, 16)` = class prototype + noise, and labels `(N,)`."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 3, 16, 16, generator=g)
    labels = torch.arange(num_classes).repeat(per_class)
    return prototypes[labels] + 0.3 * torch.randn(len(labels), 3, 16, 16, generator=g), labels


# --- registration and parameter counts -------------------------------------------------------------------------------


def test_registered_with_peft_idempotently():
    assert PeftType.RLP == "RLP"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.RLP] == "rlp_"
    importlib.reload(peft_lorsu.rlp)
    assert list(PeftType.__members__).count("RLP") == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.RLP] is peft_lorsu.rlp.RLPConfig


@pytest.mark.parametrize("rank, expected", [(1, 4 * 1 + 1 * 512), (2, 4 * 2 + 2 * 512), (4, 4 * 4 + 4 * 512)])
def test_low_rank_trainable_parameters(rank, expected):
    peft_model = get_peft_model(tiny_clip(text_width=512), RLPConfig(init_token_ids=CTX, rank=rank))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == expected
    assert expected != 516 or rank == 1  # the paper's "0.5K" for n_ctx 4, rank 1, d 512
    layer = rlp_layer(peft_model)
    assert layer.rlp_A["default"].shape == (4, rank) and layer.rlp_B["default"].shape == (rank, 512)
    assert layer.rlp_P_fr["default"].shape == (4, 512) and not layer.rlp_P_fr["default"].requires_grad


def test_full_rank_trainable_parameters():
    peft_model = get_peft_model(tiny_clip(text_width=512), RLPConfig(init_token_ids=CTX, mode="full_rank"))
    assert peft_model.get_nb_trainable_parameters()[0] == 4 * 512
    layer = rlp_layer(peft_model)
    assert set(layer.rlp_P) == {"default"} and not layer.rlp_A and not layer.rlp_P_fr


# --- initialisation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["low_rank", "full_rank"])
def test_text_init_reproduces_base_features_exactly(mode):
    ids = torch.cat([prompts(), prompts(ctx=[9, 3, 4, 2])])  # matching and non-matching prompts
    expected = text_features(tiny_clip(), ids)
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, mode=mode))
    layer = rlp_layer(peft_model)
    assert torch.equal(layer.get_context("default"), tiny_clip().text_model.embeddings.token_embedding.weight[CTX])
    assert layer.match(ids, "default").tolist() == [True] * 4 + [False] * 4
    assert torch.equal(text_features(peft_model, ids), expected)


def test_gaussian_init_moves_only_matching_prompts():
    ids = torch.cat([prompts(), prompts(ctx=[9, 3, 4, 2])])
    expected = text_features(tiny_clip(), ids)
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, init_weights="gaussian", init_std=0.5))
    out = text_features(peft_model, ids)
    assert (out[:4] - expected[:4]).abs().amax() > 1e-3
    assert torch.equal(out[4:], expected[4:])
    layer = rlp_layer(peft_model)
    delta = layer.get_delta_context("default")
    assert torch.equal(layer.get_context("default"), layer.rlp_P_fr["default"] + delta)


def test_zero_b_init_scales():
    torch.manual_seed(0)
    model = tiny_clip(text_width=512, max_positions=80)
    layer = rlp_layer(get_peft_model(model, RLPConfig(init_token_ids=CTX * 16, rank=16)))
    assert torch.count_nonzero(layer.rlp_B["default"]) == 0
    assert layer.rlp_A["default"].std().item() == pytest.approx(16**-0.5, rel=0.15)  # N(0, 1 / rank)


def test_random_init_without_tokenizer_replaces_every_prompt():
    config = RLPConfig(prompt_init="random", n_ctx=4, rank=1, init_std=0.02)
    assert config.init_token_ids is None and config.n_ctx == 4
    peft_model = get_peft_model(tiny_clip(text_width=512), config)
    layer = rlp_layer(peft_model)
    assert layer.rlp_ctx_ids["default"].tolist() == [-1] * 4
    assert layer.rlp_P_fr["default"].std().item() == pytest.approx(0.02, rel=0.1)
    ids = torch.cat([prompts(), prompts(ctx=[9, 8, 7, 6])])
    base = text_features(tiny_clip(text_width=512), ids)
    out = text_features(peft_model, ids)
    assert ((out - base).abs().amax(dim=1) > 1e-4).all()  # placeholders in every prompt are replaced
    # the same context whatever the placeholder words are: class 10 with two different placeholders agrees
    assert torch.allclose(out[0], out[4], atol=1e-6)
    with pytest.raises(ValueError, match="n_ctx=4 context vectors"):
        text_features(peft_model, torch.tensor([[BOS, 10, DOT, EOS]]))


def test_random_init_with_init_text_marks_prompts():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(prompt_init="random", init_token_ids=CTX))
    ids = torch.cat([prompts(), prompts(ctx=[9, 3, 4, 2])])
    base = text_features(tiny_clip(), ids)
    out = text_features(peft_model, ids)
    assert ((out[:4] - base[:4]).abs().amax(dim=1) > 1e-4).all()
    assert torch.equal(out[4:], base[4:])


def test_bf16_model_is_finite_and_starts_at_base():
    ids = prompts()
    base = tiny_clip().to(torch.bfloat16)
    expected = text_features(base, ids)
    peft_model = get_peft_model(tiny_clip().to(torch.bfloat16), RLPConfig(init_token_ids=CTX))
    assert rlp_layer(peft_model).rlp_B["default"].dtype == torch.float32  # peft upcasts adapter weights
    out = text_features(peft_model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, expected)


# --- training: gradients, frozen weights, dropout --------------------------------------------------------------------


def test_only_rlp_factors_train_and_everything_else_stays_bit_identical():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=2))
    trained_keys = ("rlp_A.default", "rlp_B.default")
    frozen = {k: v.clone() for k, v in peft_model.state_dict().items() if not k.endswith(trained_keys)}
    assert any("rlp_P_fr" in k for k in frozen) and any("rlp_ctx_ids" in k for k in frozen)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {
        "base_model.model.text_model.embeddings.rlp_A.default",
        "base_model.model.text_model.embeddings.rlp_B.default",
    }
    classifier = ZeroShotClassifier(peft_model, prompts())
    pixel_values, labels = synthetic_images(per_class=2)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    layer = rlp_layer(peft_model)
    start = {n: layer.rlp_A["default"].detach().clone() if n == "A" else layer.rlp_B["default"].detach().clone()
             for n in "AB"}  # fmt: skip
    peft_model.train()
    for _ in range(3):
        optimizer.zero_grad()
        classifier(pixel_values, labels).loss.backward()
        for name, p in peft_model.named_parameters():
            if name in trainable:
                assert p.grad is not None
            else:
                assert p.grad is None, name
        optimizer.step()
    assert layer.rlp_B["default"].grad.abs().sum() > 0 and layer.rlp_A["default"].grad.abs().sum() > 0
    assert not torch.equal(layer.rlp_A["default"], start["A"]) and not torch.equal(layer.rlp_B["default"], start["B"])
    after = peft_model.state_dict()
    for key, value in frozen.items():
        assert torch.equal(after[key], value), key


def test_dropout_only_in_train_mode():
    config = RLPConfig(init_token_ids=CTX, rank=2, dropout=0.5, init_weights="gaussian", init_std=0.3)
    peft_model = get_peft_model(tiny_clip(), config)
    layer = rlp_layer(peft_model)
    ids = prompts()

    peft_model.eval()
    first, second = text_features(peft_model, ids), text_features(peft_model, ids)
    assert torch.equal(first, second)
    assert torch.equal(layer._forward_context("default"), layer.get_context("default"))

    peft_model.train()
    torch.manual_seed(0)
    contexts = [layer._forward_context("default") for _ in range(4)]
    branch = contexts[0] - layer.rlp_P_fr["default"]
    delta = layer.get_delta_context("default")
    # each entry of the branch is either dropped (0) or scaled by 1 / (1 - p) = 2
    kept = branch != 0
    assert 0 < kept.float().mean() < 1
    assert torch.allclose(branch[kept], 2 * delta[kept])
    assert not all(torch.equal(contexts[0], c) for c in contexts[1:])
    features = [text_features(peft_model, ids) for _ in range(3)]
    assert not all(torch.equal(features[0], f) for f in features[1:])


def test_dropout_default_per_mode_and_round_trip(tmp_path):
    """Unset, dropout is the paper's branch dropout at 0.5 for RLP and 0 for CoOp; the resolved number is saved."""
    low, full = RLPConfig(init_token_ids=CTX), RLPConfig(init_token_ids=CTX, mode="full_rank")
    assert low.dropout == 0.5 and full.dropout == 0.0
    assert RLPConfig(init_token_ids=CTX, dropout=0.0).dropout == 0.0  # an explicit value is kept
    for config, expected in ((low, 0.5), (full, 0.0), (RLPConfig(init_token_ids=CTX, dropout=0.0), 0.0)):
        config.save_pretrained(tmp_path / str(expected) / config.mode)
        saved = json.loads((tmp_path / str(expected) / config.mode / "adapter_config.json").read_text())
        assert saved["dropout"] == expected
        assert PeftConfig.from_pretrained(tmp_path / str(expected) / config.mode).dropout == expected
    # a config saved before the default changed (dropout 0.0 written out) loads unchanged
    old = {**RLPConfig(init_token_ids=CTX).to_dict(), "dropout": 0.0}
    old["peft_type"] = "RLP"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(old))
    assert PeftConfig.from_pretrained(tmp_path / "old").dropout == 0.0
    # switching an RLP config to CoOp after construction: validate names the field and the way out
    low.mode = "full_rank"
    with pytest.raises(ValueError, match=r"dropout=0.5 .* leave dropout unset \(None\) or set it to 0.0"):
        low.validate()
    low.dropout = None
    low.validate()
    assert low.dropout == 0.0


def test_fresh_adapter_follows_the_wrapped_module_mode():
    """peft leaves new modules in train mode; the dropout of a new adapter follows the model's mode instead."""
    ids = prompts()
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, init_weights="gaussian", init_std=0.3))
    assert not rlp_layer(peft_model).rlp_dropout["default"].training  # tiny_clip() is in eval mode
    assert torch.equal(text_features(peft_model, ids), text_features(peft_model, ids))
    base = tiny_clip().train()
    peft_model = get_peft_model(base, RLPConfig(init_token_ids=CTX))
    assert rlp_layer(peft_model).rlp_dropout["default"].training


# --- save / load -----------------------------------------------------------------------------------------------------


def build_tokenizer(path: str) -> str:
    """A word-level CLIP BPE tokenizer over a few words, saved to `path`."""
    words = ["a", "photo", "of", "cat", "dog", "."]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges = []
    for word in words:
        chars = list(word)
        chars[-1] += "</w>"
        for c in chars:
            vocab.setdefault(c, len(vocab))
        current = chars[0]
        for c in chars[1:]:
            merges.append((current, c))
            current += c
            vocab.setdefault(current, len(vocab))
    # the files every transformers version reads (5.x's CLIPTokenizer(vocab=, merges=) does not exist in 4.x)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    CLIPTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def test_save_load_is_bit_identical_and_self_contained(tmp_path):
    tokenizer_dir = build_tokenizer(str(tmp_path / "tokenizer"))
    config = RLPConfig(init_text="a photo of a", tokenizer_name_or_path=tokenizer_dir, rank=2)
    assert config.init_token_ids == [2, 11, 13, 2] and config.n_ctx == 4
    peft_model = get_peft_model(tiny_clip(), config)
    randomize_adapter(peft_model)
    ids = torch.cat([prompts(ctx=config.init_token_ids), prompts()])
    expected = text_features(peft_model, ids)

    peft_model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md"}  # no pickle anywhere
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.text_model.embeddings."
    assert set(tensors) == {prefix + n for n in ("rlp_A", "rlp_B", "rlp_P_fr", "rlp_ctx_ids")}
    assert tensors[prefix + "rlp_ctx_ids"].tolist() == [2, 11, 13, 2]
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RLP" and saved["init_token_ids"] == [2, 11, 13, 2]

    # the tokenizer is gone: loading relies on the saved ids, and P_fr comes from the file, not the new base model
    for name in os.listdir(tokenizer_dir):
        os.remove(os.path.join(tokenizer_dir, name))
    for low_cpu_mem_usage in (False, True):
        base = tiny_clip()
        with torch.no_grad():  # P_fr must come from the file, not be re-derived from this edited embedding
            base.text_model.embeddings.token_embedding.weight[2] += 1.0
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter", low_cpu_mem_usage=low_cpu_mem_usage)
        assert isinstance(loaded.peft_config["default"], RLPConfig)
        layer = rlp_layer(loaded)
        assert torch.equal(layer.rlp_P_fr["default"], rlp_layer(peft_model).rlp_P_fr["default"])
        # outputs differ from the original only where the edited base embedding is used outside the context
        out = text_features(loaded, ids)
        assert torch.equal(out[:4], expected[:4])
        assert layer.rlp_A["default"].device.type == "cpu" and not layer.rlp_A["default"].requires_grad

    restored = PeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    assert torch.equal(text_features(restored, ids), expected)
    config_back = PeftConfig.from_pretrained(tmp_path / "adapter")
    assert config_back.n_ctx == 4 and config_back.rank == 2 and config_back.target_modules == {"text_model.embeddings"}


def test_text_model_only_round_trip(tmp_path):
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = CLIPTextModel(text_config).eval()
    # transformers >= 5.6 flattens CLIPTextModel; before, its modules are under .text_model
    embeddings = "text_model.embeddings" if hasattr(model, "text_model") else "embeddings"
    peft_model = get_peft_model(model, RLPConfig(init_token_ids=CTX))
    assert peft_model.peft_config["default"].target_modules == {embeddings}
    randomize_adapter(peft_model)
    expected = peft_model(input_ids=prompts()).pooler_output
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(CLIPTextModel(text_config).eval(), tmp_path)
    assert torch.equal(loaded(input_ids=prompts()).pooler_output, expected)


# --- merge -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["low_rank", "full_rank"])
def test_merged_equals_unmerged(mode):
    rank = 2 if mode == "low_rank" else 1
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=rank, mode=mode))
    randomize_adapter(peft_model)
    ids = torch.cat([prompts(), prompts(ctx=[9, 3, 4, 2])])
    unmerged = text_features(peft_model, ids)
    layer = rlp_layer(peft_model)
    context = layer.get_context("default").detach().clone()

    peft_model.merge_adapter()
    assert layer.merged and torch.equal(layer._merged_context["default"], context)
    assert torch.equal(text_features(peft_model, ids), unmerged)
    with torch.no_grad():  # the merged forward no longer reads the trainable tensors
        for p in peft_model.parameters():
            if p.requires_grad:
                p.zero_()
    assert torch.equal(text_features(peft_model, ids), unmerged)
    with pytest.warns(UserWarning, match="already merged"):
        peft_model.merge_adapter()
    peft_model.unmerge_adapter()
    assert not layer.merged and not layer._merged_context
    assert not torch.equal(text_features(peft_model, ids), unmerged)  # back to the (now zeroed) adapter


def test_merge_and_unload_needs_confirmation_and_folds_into_positions():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=2))
    randomize_adapter(peft_model)
    ids = prompts()
    expected = text_features(peft_model, ids)
    with pytest.raises(ValueError, match="fold_into_position_embedding=True"):
        peft_model.merge_and_unload()
    plain = peft_model.merge_and_unload(fold_into_position_embedding=True)
    assert type(plain) is CLIPModel
    assert not any(isinstance(m, RLPTextEmbedding) for m in plain.modules())
    assert torch.allclose(text_features(plain, ids), expected, atol=1e-5, rtol=0)
    positions = plain.text_model.embeddings.position_embedding.weight
    original = tiny_clip().text_model.embeddings.position_embedding.weight
    assert torch.equal(positions[5:], original[5:]) and torch.equal(positions[0], original[0])
    assert not torch.equal(positions[1:5], original[1:5])


def test_merge_and_unload_refuses_what_it_cannot_fold():
    wildcard = get_peft_model(tiny_clip(), RLPConfig(prompt_init="random", n_ctx=4))
    with pytest.raises(ValueError, match="no init text"):
        wildcard.merge_and_unload(fold_into_position_embedding=True)
    two = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX))
    two.add_adapter("other", RLPConfig(init_token_ids=OTHER_CTX))
    two.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="exactly one adapter"):
        two.merge_and_unload(fold_into_position_embedding=True)


def test_unload_returns_untouched_base():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX))
    randomize_adapter(peft_model)
    base = peft_model.unload()
    assert torch.equal(text_features(base, prompts()), text_features(tiny_clip(), prompts()))


# --- adapters --------------------------------------------------------------------------------------------------------


def test_disable_adapter_gives_base_and_restores():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX))
    randomize_adapter(peft_model)
    ids = prompts()
    adapted = text_features(peft_model, ids)
    with peft_model.disable_adapter():
        assert torch.equal(text_features(peft_model, ids), text_features(tiny_clip(), ids))
    assert torch.equal(text_features(peft_model, ids), adapted)


def test_multiple_named_adapters():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=1))
    peft_model.add_adapter("other", RLPConfig(init_token_ids=OTHER_CTX, mode="full_rank"))
    randomize_adapter(peft_model)
    layer = rlp_layer(peft_model)
    assert layer.n_ctx == {"default": 4, "other": 2}
    ids_a = prompts()
    ids_b = torch.cat([prompts(ctx=OTHER_CTX), torch.full((4, 2), EOS)], dim=1)  # padded to the same length
    ids = torch.cat([ids_a, ids_b])
    base = text_features(tiny_clip(), ids)

    only_default = text_features(peft_model, ids)
    assert (only_default[:4] != base[:4]).any() and torch.equal(only_default[4:], base[4:])
    peft_model.set_adapter("other")
    only_other = text_features(peft_model, ids)
    assert torch.equal(only_other[:4], base[:4]) and (only_other[4:] != base[4:]).any()
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        "base_model.model.text_model.embeddings.rlp_P.other"
    }
    peft_model.base_model.set_adapter(["default", "other"])
    both = text_features(peft_model, ids)
    assert torch.equal(both[:4], only_default[:4]) and torch.equal(both[4:], only_other[4:])

    clash = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX))
    clash.add_adapter("same_text", RLPConfig(init_token_ids=CTX))
    clash.base_model.set_adapter(["default", "same_text"])
    with pytest.raises(ValueError, match="another active adapter"):
        text_features(clash, ids_a)

    peft_model.base_model.set_adapter("default")
    peft_model.delete_adapter("other")
    assert layer.n_ctx == {"default": 4} and "other" not in layer.rlp_P and "other" not in layer.rlp_ctx_ids
    assert "other" not in layer.rlp_dropout and "other" not in layer.mode


# --- Trainer and learning --------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> None:
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def test_trainer_with_class_cross_entropy(tmp_path):
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=1))
    frozen = {k: v.clone() for k, v in peft_model.state_dict().items() if "rlp_A" not in k and "rlp_B" not in k}
    classifier = ZeroShotClassifier(peft_model, prompts())
    pixel_values, labels = synthetic_images(per_class=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=0.05, use_cpu=True,
        report_to="none", remove_unused_columns=False, save_strategy="no", logging_strategy="no",
        lr_scheduler_type="constant", optim="sgd", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=classifier,
        args=args,
        train_dataset=ImageDataset(pixel_values, labels),
        compute_loss_func=class_cross_entropy,
    )
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert rlp_layer(peft_model).rlp_B["default"].abs().sum() > 0  # started at zero, moved by training
    after = peft_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_clip_forward_over_class_prompts_trains_the_same_context():
    """CLIPModel's own forward (input_ids = the C prompts) gives the classifier's logits and gradients."""
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, rank=1))
    randomize_adapter(peft_model)
    pixel_values, labels = synthetic_images(per_class=1)
    via_clip = class_cross_entropy(peft_model(input_ids=prompts(), pixel_values=pixel_values), labels)
    via_clip.backward()
    grad = rlp_layer(peft_model).rlp_B["default"].grad.clone()
    peft_model.zero_grad()
    via_classifier = ZeroShotClassifier(peft_model, prompts())(pixel_values, labels)
    via_classifier.loss.backward()
    assert torch.allclose(via_clip, via_classifier.loss, atol=1e-6)
    assert torch.allclose(grad, rlp_layer(peft_model).rlp_B["default"].grad, atol=1e-6)


@pytest.mark.parametrize("mode", ["low_rank", "full_rank"])
def test_prompt_learning_raises_accuracy(mode):
    """A random CLIP classifies 4 synthetic image classes near chance; learning the shared context fixes that."""
    pixel_values, labels = synthetic_images()
    loader = [{"pixel_values": pixel_values, "labels": labels}]
    class_prompts = {"input_ids": prompts()}
    # The same seed draws other weights under transformers 4.x and 5.x; seed 3 and 120 steps clear the thresholds with
    # a margin on both (checked: 4.57.6 and 5.25.0; 60 steps from seed 0 reach only 0.75 on 4.57.6). Dropout off:
    # this checks the gradient path, and the default 0.5's regularisation (0.72 here) is the benchmark's question.
    config = RLPConfig(init_token_ids=CTX, rank=1, mode=mode, dropout=0.0)
    peft_model = get_peft_model(tiny_clip(seed=3), config)
    before = zero_shot_accuracy(peft_model, loader, class_prompts)
    classifier = ZeroShotClassifier(peft_model, prompts())
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.01)
    peft_model.train()
    for _ in range(120):
        optimizer.zero_grad()
        classifier(pixel_values, labels).loss.backward()
        optimizer.step()
    after = zero_shot_accuracy(peft_model, loader, class_prompts)
    assert before <= 0.45
    assert after >= 0.8 and after >= before + 0.35, (before, after)
    assert peft_model.training  # zero_shot_accuracy restores the mode


# --- validation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_token_ids=CTX, rank=0), "rank must be an integer >= 1, got 0"),
        (dict(init_token_ids=CTX, rank=1.5), "rank must be an integer"),
        (dict(init_token_ids=CTX, rank=5), r"rank=5 exceeds n_ctx=4"),
        (dict(init_token_ids=CTX, dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        (dict(init_token_ids=CTX, dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(init_token_ids=CTX, mode="full_rank", dropout=0.1), "mode='full_rank' does not have"),
        (dict(init_token_ids=CTX, mode="coop"), r"mode must be one of \('low_rank', 'full_rank'\)"),
        (dict(init_token_ids=CTX, prompt_init="zeros"), "prompt_init must be one of"),
        (dict(init_token_ids=CTX, init_weights="ones"), "init_weights must be one of"),
        (dict(init_token_ids=CTX, init_std=0.0), "init_std must be > 0"),
        (dict(init_token_ids=CTX, n_ctx=3), "n_ctx=3 disagrees with the init text"),
        (dict(init_token_ids=[]), "init_token_ids must be a non-empty list"),
        (dict(init_token_ids=[2, -1]), "init_token_ids must hold integer token ids >= 0"),
        (dict(), "prompt_init='text' needs an init text"),
        (dict(init_text="a photo of a"), "needs tokenizer_name_or_path"),
        (dict(init_text="   ", tokenizer_name_or_path="unused"), "init_text='   ' is empty"),
        (dict(prompt_init="random"), "n_ctx must be set"),
        (dict(prompt_init="random", n_ctx=0), "n_ctx must be an integer >= 1, got 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RLPConfig(**kwargs)


def test_init_text_disagreeing_with_n_ctx(tmp_path):
    tokenizer_dir = build_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="n_ctx=3 disagrees with the init text 'a photo of a', which has 4 tokens"):
        RLPConfig(init_text="a photo of a", tokenizer_name_or_path=tokenizer_dir, n_ctx=3)
    assert RLPConfig(init_text="a photo of a", tokenizer_name_or_path=tokenizer_dir, n_ctx=4).n_ctx == 4


def test_init_text_that_tokenises_to_nothing(monkeypatch):
    class DropsEverything:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: DropsEverything())
    with pytest.raises(ValueError, match="init_text='~' tokenises to no tokens with tokenizer 'stub'"):
        RLPConfig(init_text="~", tokenizer_name_or_path="stub")


def test_full_rank_ignores_rank_with_warning():
    with pytest.warns(UserWarning, match="rank=2 is ignored"):
        RLPConfig(init_token_ids=CTX, mode="full_rank", rank=2)


def test_layer_validation_against_the_model():
    narrow = tiny_clip(text_width=4, heads=1)
    with pytest.raises(ValueError, match=r"rank=5 exceeds min\(n_ctx, width\) = min\(6, 4\)"):
        get_peft_model(narrow, RLPConfig(init_token_ids=[2] * 6, rank=5))
    with pytest.raises(ValueError, match="outside the text tower's vocabulary of 50 tokens"):
        get_peft_model(tiny_clip(), RLPConfig(init_token_ids=[2, 50]))
    with pytest.raises(ValueError, match="max_position_embeddings=16; use n_ctx <= 14"):
        get_peft_model(tiny_clip(), RLPConfig(init_token_ids=[2] * 15))


def test_model_without_clip_text_tower_is_rejected():
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, image_size=16, patch_size=8))  # fmt: skip
    with pytest.raises(ValueError, match="CLIPVisionModel has none. Supported models: CLIPModel, CLIPTextModel"):
        get_peft_model(vision, RLPConfig(init_token_ids=CTX))
    with pytest.raises(TypeError, match="RLP only wraps CLIP text embeddings"):
        get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX, target_modules=["vision_model.embeddings"]))


def test_rlp_model_class_and_context_accessor():
    peft_model = get_peft_model(tiny_clip(), RLPConfig(init_token_ids=CTX))
    assert isinstance(peft_model.base_model, RLPModel)
    assert peft_model.base_model.get_context().shape == (4, 64)
    with pytest.raises(ValueError, match="no RLP adapter named 'missing'"):
        peft_model.base_model.get_context("missing")
