"""Reliability and security: bad configs, adapters for another base, unsafe or broken files, interrupted saves,
a probe that fails halfway, and base-model dtypes. See docs/reliability.md for what each test guarantees."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from pathlib import Path

import peft.peft_model
import pytest
import torch
from conftest import VOCAB, clip_batches, needs_structural_peft, tiny_clip, tiny_clip_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.config import PeftConfigMixin
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

import peft_lorsu
from peft_lorsu import LoRSUConfig, LoRSURLPConfig, RLPConfig, probe_lorsu, safe_load_adapter, save_adapter_atomic
from peft_lorsu.compat import pooled_features
from peft_lorsu.loading import shadow_copy
from peft_lorsu.rlp import RLPTextEmbedding

# Exceptions that mean "crashed somewhere inside torch / transformers / peft" instead of a clear refusal.
CRASHES = (TypeError, RuntimeError, IndexError, KeyError, AttributeError, AssertionError, ZeroDivisionError)
HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CTX = [5, 6, 7]  # made-up init text ids inside conftest's vocabulary of 99


# --------------------------------------------------------------------------------------------------- helpers


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave as it was: weights, module types, requires_grad flags, peft_config."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "flags": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "peft_config": "peft_config" in vars(model),
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "a module of the base model was replaced"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["peft_config"] == before["peft_config"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), f"{key} changed"


def assert_refused(folder: Path, match: str, base: torch.nn.Module | None = None, load=None) -> str:
    """Loading ``folder`` onto ``base`` raises a ValueError matching ``match`` and leaves ``base`` untouched."""
    base = tiny_clip() if base is None else base
    before = snapshot(base)
    with pytest.raises(ValueError, match=match) as info:
        (load or PeftModel.from_pretrained)(base, folder)
    assert_untouched(base, before)
    return str(info.value)


def assert_clear(exc: ValueError, owner: str) -> None:
    """A refusal names the config class (and so the field) it is about."""
    assert owner in str(exc), f"unclear error: {exc}"


def save_lorsu(folder: Path, model: torch.nn.Module | None = None, seed: int = 0, **kwargs) -> PeftModel:
    config = LoRSUConfig(**{"r": 4, "selection": "random", "init_weights": False, "seed": seed, **kwargs})
    peft_model = get_peft_model(model if model is not None else tiny_clip(), config)
    peft_model.save_pretrained(folder)
    return peft_model


def save_rlp(folder: Path, model: torch.nn.Module | None = None, **kwargs) -> PeftModel:
    config = RLPConfig(**{"init_token_ids": CTX, "rank": 2, "init_weights": "gaussian", **kwargs})
    peft_model = get_peft_model(model if model is not None else tiny_clip(), config)
    peft_model.save_pretrained(folder)
    return peft_model


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits_per_image


def ctx_prompts(ctx: list[int] = CTX, length: int = 8, batch: int = 3) -> torch.Tensor:
    """`(batch, length)` ids ``[BOS] ctx class ... [EOS]`` (BOS 0, EOS 2 in conftest's vocabulary)."""
    ids = torch.full((batch, length), 9)
    ids[:, 0], ids[:, -1] = 0, 2
    ids[:, 1 : 1 + len(ctx)] = torch.tensor(ctx)
    ids[:, 1 + len(ctx)] = torch.arange(10, 10 + batch)
    return ids


# ------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"init_weights": 1}, "init_weights"),  # 1 == True, but not a bool
        ({"adapt_mlp": "yes"}, "adapt_mlp"),
        ({"share_qkv_factor": None}, "share_qkv_factor"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"probe_samples": True}, "probe_samples"),
        ({"layers_to_transform": [True]}, "layers_to_transform"),
        ({"target_modules": "("}, "target_modules"),
        ({"lora_alpha": math.inf}, "lora_alpha"),
        ({"lora_alpha": math.nan}, "lora_alpha"),
        ({"sparsity": "0.1"}, "sparsity"),
        ({"lora_dropout": math.nan}, "lora_dropout"),
        ({"selected_heads": {"a": [0, -1]}}, "selected_heads"),
        ({"selected_heads": {"a": [0.5, 1]}}, "selected_heads"),
        ({"head_scores": {"a": [math.nan]}}, "head_scores"),
        ({"modules_to_save": [1]}, "modules_to_save"),
        ({"weights_sha256": "abc"}, "weights_sha256"),
    ],
)
def test_lorsu_config_names_field_value_and_range(kwargs, field):
    with pytest.raises(ValueError, match=rf"LoRSUConfig\.{field} must be .*, got ") as info:
        LoRSUConfig(**kwargs)
    assert repr(kwargs[field])[:6] in str(info.value)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dropout": "0.1"}, "dropout"),
        ({"dropout": math.nan}, "dropout"),
        ({"init_std": math.inf}, "init_std"),
        ({"init_std": "x"}, "init_std"),
        ({"n_ctx": True, "prompt_init": "random"}, "n_ctx"),
        ({"n_ctx": 2.0, "prompt_init": "random"}, "n_ctx"),
        ({"rank": True}, "rank"),
        ({"mode": None}, "mode"),
        ({"init_text": 5}, "init_text"),
        ({"tokenizer_kwargs": ["use_fast"]}, "tokenizer_kwargs"),
        ({"target_modules": 5}, "target_modules"),
        ({"modules_to_save": "text_projection"}, "modules_to_save"),
        ({"weights_sha256": "F" * 64}, "weights_sha256"),
    ],
)
def test_rlp_config_names_field_value_and_range(kwargs, field):
    with pytest.raises(ValueError, match=rf"RLPConfig\.{field}.* must be .*, got ") as info:
        RLPConfig(**{"init_token_ids": CTX, **kwargs})
    assert repr(kwargs[field])[:6] in str(info.value)


def test_rlp_tokenizer_may_not_run_remote_code():
    """An adapter config could otherwise make loading download and run code with its tokenizer."""
    with pytest.raises(ValueError, match="tokenizer_kwargs must not enable trust_remote_code"):
        RLPConfig(
            init_text="a photo of a",
            tokenizer_name_or_path="someone/tokenizer",
            **{"tokenizer_kwargs": {"trust_" + "remote_code": True}},
        )


def test_no_remote_code_anywhere_in_the_project():
    root = Path(peft_lorsu.__file__).parent.parent
    needle = "trust_" + "remote_code"
    sources = [*root.joinpath("peft_lorsu").rglob("*.py"), *root.joinpath("examples").rglob("*.py")]
    sources += [*root.joinpath("benchmarks").rglob("*.py")]
    offenders = [str(p) for p in sources if needle in p.read_text(encoding="utf-8")]
    # the one mention allowed: RLPConfig refusing it in tokenizer_kwargs
    assert offenders == [str(root / "peft_lorsu" / "rlp" / "config.py")]
    assert 'kwargs.get("' + needle + '")' in (root / "peft_lorsu" / "rlp" / "config.py").read_text()


def test_fields_edited_after_construction_are_checked_before_wrapping():
    model = tiny_clip()
    before = snapshot(model)
    config = LoRSUConfig(r=4, selection="random")
    config.r = 0
    with pytest.raises(ValueError, match=r"LoRSUConfig\.r must be an integer >= 1, got 0"):
        get_peft_model(model, config)
    rlp = RLPConfig(init_token_ids=CTX)
    rlp.rank = 9
    with pytest.raises(ValueError, match=r"RLPConfig\.rank=9 exceeds n_ctx=3"):
        get_peft_model(model, rlp)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------- property-based: LoRSU

LORSU_KWARGS = st.fixed_dictionaries(
    {
        "r": st.one_of(st.integers(1, 12), st.sampled_from([0, -1, 2.5, True, "4", None])),
        "lora_alpha": st.one_of(st.floats(0.5, 32), st.sampled_from([0, -1.0, math.inf, math.nan, "8"])),
        "lora_dropout": st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, -0.1, math.nan]),
        "top_k_heads": st.one_of(st.integers(1, 5), st.sampled_from([0, 1.0, False])),
        "sparsity": st.one_of(st.floats(1e-3, 1.0), st.sampled_from([0.0, 1.5, math.nan, None])),
        "tower": st.sampled_from(["vision", "vision", "text", "both", "audio", 3]),
        "layers_to_transform": st.one_of(
            st.none(), st.integers(0, 3), st.lists(st.integers(0, 3), max_size=3), st.sampled_from([[-1], ["0"], "0"])
        ),
        "adapt_attention": st.booleans(),
        "adapt_mlp": st.booleans(),
        "adapt_projection": st.booleans(),
        "train_biases": st.booleans(),
        "share_qkv_factor": st.one_of(st.booleans(), st.just("yes")),
        "init_weights": st.sampled_from([True, False, "lorsu", "lora", "gaussian", 1]),
        "seed": st.one_of(st.integers(0, 2**32), st.sampled_from([-1, 1.5])),
        "target_modules": st.one_of(st.none(), st.sampled_from([["q_proj", "fc1"], r".*fc1", "(", ["nothing"], [3]])),
    }
)
SHAPES = st.fixed_dictionaries(
    {"width": st.sampled_from([16, 32]), "heads": st.sampled_from([1, 2, 4]), "layers": st.integers(1, 3)}
)


def build_or_refuse(make_config, model: torch.nn.Module, owner: str):
    """``get_peft_model(model, make_config())``, or ``None`` after a clear ValueError that left ``model`` untouched."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = make_config()
    except ValueError as exc:
        assert_clear(exc, owner)
        return None
    before = snapshot(model)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        assert_clear(exc, owner)
        assert_untouched(model, before)
        return None


@HYPOTHESIS
@given(kwargs=LORSU_KWARGS, shape=SHAPES)
def test_lorsu_config_space_gives_a_model_or_a_clear_error(kwargs, shape):
    model = tiny_clip(**shape)
    try:
        peft_model = build_or_refuse(lambda: LoRSUConfig(selection="random", **kwargs), model, "LoRSUConfig")
        if peft_model is None:
            return
        batch = clip_batches(n=1, batch_size=2)[0]
        out = peft_model(**batch, return_loss=True)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits_per_image).all()
        out.loss.backward()
    except CRASHES as exc:
        pytest.fail(f"LoRSU with {kwargs} on {shape} crashed instead of refusing: {type(exc).__name__}: {exc}")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    top_k_heads=st.integers(1, 5),
    sparsity=st.floats(1e-3, 1.0),
    layers=st.one_of(st.none(), st.lists(st.integers(0, 2), min_size=1, max_size=2)),
    tower=st.sampled_from(["vision", "text", "both"]),
)
def test_probed_config_space_gives_a_model_or_a_clear_error(top_k_heads, sparsity, layers, tower):
    """The same through the gradient probe: the probe refuses clearly or its selection builds a working model."""
    model = tiny_clip(layers=2)
    before = snapshot(model)
    config = LoRSUConfig(r=2, top_k_heads=top_k_heads, sparsity=sparsity, layers_to_transform=layers, tower=tower)
    try:
        probe_lorsu(model, config, clip_batches(n=2, batch_size=2), show_progress=False)
    except ValueError as exc:
        assert_clear(exc, "LoRSUConfig")
        assert_untouched(model, before)
        return
    except CRASHES as exc:
        pytest.fail(f"probe crashed: {type(exc).__name__}: {exc}")
    assert_untouched(model, before)
    peft_model = get_peft_model(model, config)
    assert torch.isfinite(logits(peft_model, clip_batches(n=1, batch_size=2)[0])).all()


# --------------------------------------------------------------------------------------- property-based: RLP

RLP_KWARGS = st.fixed_dictionaries(
    {
        "n_ctx": st.one_of(st.none(), st.integers(1, 16), st.sampled_from([0, -2, 2.0, True])),
        "rank": st.one_of(st.integers(1, 6), st.sampled_from([0, 1.5])),
        "dropout": st.sampled_from([0.0, 0.0, 0.2, 1.0, -0.5, "0.1"]),
        "mode": st.sampled_from(["low_rank", "low_rank", "full_rank", "coop"]),
        "prompt_init": st.sampled_from(["text", "random", "random", "zeros"]),
        "init_token_ids": st.one_of(st.none(), st.lists(st.integers(3, VOCAB + 20), min_size=0, max_size=6)),
        "init_weights": st.sampled_from(["zero_b", "gaussian", "ones"]),
        "init_std": st.sampled_from([0.02, 1.0, 0.0, math.inf, "x"]),
    }
)


@HYPOTHESIS
@given(kwargs=RLP_KWARGS, text_width=st.sampled_from([8, 32]))
def test_rlp_config_space_gives_a_model_or_a_clear_error(kwargs, text_width):
    model = tiny_clip(text_width=text_width)
    try:
        peft_model = build_or_refuse(lambda: RLPConfig(**kwargs), model, "RLPConfig")
        if peft_model is None:
            return
        config = peft_model.peft_config["default"]
        ctx = config.init_token_ids or [9] * config.n_ctx
        length = min(len(ctx) + 4, 16)  # the tiny text tower has 16 positions
        ids = ctx_prompts(ctx, length=length) if len(ctx) + 4 <= 16 else torch.full((3, 16), 9)
        try:
            features = pooled_features(peft_model.get_text_features(input_ids=ids))
        except ValueError as exc:  # prompts too short for a context without init text: a clear refusal
            assert "n_ctx" in str(exc)
            return
        assert torch.isfinite(features).all()
        assert torch.isfinite(peft_model.base_model.get_context()).all()
    except CRASHES as exc:
        pytest.fail(f"RLP with {kwargs} (width {text_width}) crashed instead of refusing: {type(exc).__name__}: {exc}")


# ----------------------------------------------------------------------------------- adapters for another base


@pytest.mark.parametrize(
    "saved_on, load_on, adapter, match",
    [
        ({}, dict(width=64), {}, r"vision_model\.encoder\.layers\.0\.self_attn\.k_proj\.lorsu_V: shape \(4, 32\) in"),
        (
            {},
            dict(heads=2),
            {},
            r"selected_heads\['vision_model\.encoder\.layers\.1\.self_attn'\]=\[0, 2\] lies outside 0\.\.1",
        ),
        (
            {},
            dict(heads=2),
            dict(top_k_heads=1, seed=2),
            r"q_proj\.lorsu_rows: shape \(8,\) in the adapter, \(16,\) in this",
        ),
        ({}, dict(layers=3), {}, r"selected_heads has no entry for \['vision_model\.encoder\.layers\.2\.self_attn'\]"),
        ({}, dict(layers=3), dict(adapt_attention=False), r"layers\.2\.mlp\.fc1: this model needs lorsu_bias \(64,\)"),
        ({}, dict(layers=1), {}, r"layers\.1\.mlp\.fc1: the adapter holds .* but this model has no such module"),
        ({}, dict(text_width=64), dict(tower="text"), r"text_model\.encoder\.layers\.0\..* shape"),
    ],
    ids=["width", "heads", "head-size", "more-layers", "more-layers-no-heads", "fewer-layers", "text-width"],
)
def test_lorsu_adapter_for_another_base_is_refused_before_wrapping(tmp_path, saved_on, load_on, adapter, match):
    save_lorsu(tmp_path, tiny_clip(**saved_on), **adapter)
    base = tiny_clip(**load_on)
    message = assert_refused(tmp_path, match, base)
    assert "does not fit this CLIPModel; nothing was changed" in message
    assert_refused(
        tmp_path, match, base, lambda model, folder: safe_load_adapter(model, folder, low_cpu_mem_usage=True)
    )


def test_lorsu_adapter_with_modules_the_base_lacks(tmp_path):
    """A CLIPModel adapter loaded onto a bare CLIPVisionModel: other module paths, and no projection to adapt."""
    save_lorsu(tmp_path, adapt_attention=False)  # (with heads, the missing selected_heads entries are named first)
    torch.manual_seed(0)
    vision = CLIPVisionModel(tiny_clip_config().vision_config)
    message = assert_refused(tmp_path, "does not fit this CLIPVisionModel", vision)
    if hasattr(vision, "vision_model"):  # transformers < 5.6: CLIPVisionModel's paths are CLIPModel's
        assert "visual_projection: the adapter holds lorsu_U, lorsu_V, but this model has no such module" in message
        assert "extra prefix" not in message and "mlp.fc1" not in message
    else:  # transformers >= 5.6 flattens CLIPVisionModel
        assert (
            "vision_model.encoder.layers.0.mlp.fc1: the adapter holds lorsu_bias, lorsu_indices, lorsu_values, but "
            "this model has no such module" in message
        )
        assert (
            "the adapter's module paths carry an extra prefix 'vision_model.': the adapter was saved from a model of "
            "another class" in message
        )

    # same paths, but the projection is missing: only that is reported
    save_lorsu(tmp_path, adapt_projection=True)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    forget_hash(tmp_path)
    without_projection = {k: v for k, v in tensors.items() if "visual_projection" not in k}
    save_file(without_projection, tmp_path / "adapter_model.safetensors")
    assert_refused(tmp_path, r"visual_projection: this model needs lorsu_U \(16, 4\), lorsu_V \(4, 32\)")


def test_rlp_adapter_for_another_text_width_is_refused_before_wrapping(tmp_path):
    save_rlp(tmp_path)
    match = r"text_model\.embeddings\.rlp_B: shape \(2, 32\) in the adapter, \(2, 64\)"
    assert_refused(tmp_path, match, tiny_clip(text_width=64))


def test_rlp_weights_and_config_must_belong_together(tmp_path):
    save_rlp(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "init_token_ids": [5, 6, 8]}))
    assert_refused(tmp_path, r"rlp_ctx_ids\['default'\]=\[5, 6, 7\] disagree with the init_token_ids")


@needs_structural_peft
@pytest.mark.parametrize("load_on", [dict(width=64), dict(text_width=64)], ids=["image-width", "text-width"])
def test_joint_adapter_for_another_base_is_refused_before_wrapping(tmp_path, load_on):
    config = LoRSURLPConfig(
        lorsu=LoRSUConfig(r=4, selection="random", init_weights=False), rlp=RLPConfig(init_token_ids=CTX)
    )
    get_peft_model(tiny_clip(), config).save_pretrained(tmp_path)
    part = "vision_model.encoder.layers.0.mlp.fc1.lorsu_bias" if "width" in load_on else "text_model.embeddings.rlp_B"
    assert_refused(tmp_path, rf"{part}: shape .* in the adapter", tiny_clip(**load_on))
    assert_refused(tmp_path, "does not fit", tiny_clip(**load_on), safe_load_adapter)


def test_mismatched_adapter_added_to_a_peft_model_leaves_it_as_it_was(tmp_path):
    save_lorsu(tmp_path / "small")
    save_lorsu(tmp_path / "wide", tiny_clip(width=64))
    peft_model = PeftModel.from_pretrained(tiny_clip(), tmp_path / "small")
    batch = clip_batches(n=1)[0]
    expected = logits(peft_model, batch)
    before = snapshot(peft_model)
    for load in (
        lambda: peft_model.load_adapter(tmp_path / "wide", adapter_name="wide"),
        lambda: safe_load_adapter(peft_model, tmp_path / "wide", adapter_name="wide"),
    ):
        with pytest.raises(ValueError, match="does not fit"):
            load()
        assert list(peft_model.peft_config) == ["default"]
        assert_untouched(peft_model, before)
    assert torch.equal(logits(peft_model, batch), expected)
    with pytest.raises(ValueError, match="adapter_name='default' is already loaded"):
        safe_load_adapter(peft_model, tmp_path / "small")
    safe_load_adapter(peft_model, tmp_path / "small", adapter_name="again")
    assert sorted(peft_model.peft_config) == ["again", "default"]


def test_shadow_copy_has_the_shapes_but_no_memory():
    model = tiny_clip()
    shadow = shadow_copy(model)
    for (name, p), (_, q) in zip(model.named_parameters(), shadow.named_parameters()):
        assert q.shape == p.shape and q.dtype == p.dtype and q.stride() == (0,) * p.dim() and q is not p, name
    q_proj = model.vision_model.encoder.layers[0].self_attn.q_proj
    assert shadow.vision_model.encoder.layers[0].self_attn.q_proj is not q_proj


def test_a_config_read_then_edited_is_not_checked_against_its_folder(tmp_path):
    """The folder check applies to the load that reads it; a config used as a template for a new adapter is free."""
    save_lorsu(tmp_path)
    config = LoRSUConfig.from_pretrained(tmp_path)
    config.r = 2
    peft_model = get_peft_model(tiny_clip(), config)
    assert peft_model.base_model.model.visual_projection.lorsu_U["default"].shape == (16, 2)


# --------------------------------------------------------------------------------------- unsafe or broken files


def test_truncated_weights_are_refused_before_wrapping(tmp_path):
    save_lorsu(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_refused(tmp_path, "is not a valid safetensors file .*incomplete metadata")


def test_edited_weights_are_refused(tmp_path):
    save_lorsu(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one byte of one value: still a valid safetensors file
    weights.write_bytes(bytes(data))
    assert_refused(tmp_path, "is not the file that was saved with adapter_config.json")


def forget_hash(folder: Path) -> None:
    """Make a folder look like an adapter saved before weights_sha256 existed."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "weights_sha256": None}))


def test_edited_header_and_non_finite_values_are_refused_without_a_hash(tmp_path):
    save_lorsu(tmp_path)
    forget_hash(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("q_proj.lorsu_U"))
    broken = tensors[key].clone()
    broken[0, 0] = math.nan
    for edited, match in [
        (tensors[key].to(torch.int32), r"q_proj\.lorsu_U: torch\.int32 in the adapter, this model needs a floating"),
        (tensors[key][:, :2].contiguous(), r"q_proj\.lorsu_U: shape \(16, 2\) in the adapter, \(16, 4\) in this"),
        (broken, r"tensor\(s\) .*q_proj\.lorsu_U hold NaN or inf"),
    ]:
        save_file({**tensors, key: edited}, weights)
        assert_refused(tmp_path, match)


def test_pickle_files_are_refused_and_never_read(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called: a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    save_lorsu(tmp_path)
    base = tiny_clip()
    before = snapshot(base)
    (tmp_path / "adapter_model.bin").write_bytes(b"pretend pickle")
    for load in (PeftModel.from_pretrained, safe_load_adapter):
        with pytest.raises(ValueError, match=r"contains pickle file\(s\) \['adapter_model\.bin'\]"):
            load(base, tmp_path)
    # without the safetensors file PEFT itself would fall back to torch.load on adapter_model.bin
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def test_safe_load_refuses_any_pickle_while_from_pretrained_accepts_checkpoint_folders(tmp_path):
    """A Trainer checkpoint holds optimizer.pt etc. next to the adapter: PEFT's loader reads only the adapter files
    (and resuming must keep working), the strict loader refuses the whole folder."""
    expected = save_lorsu(tmp_path)
    (tmp_path / "optimizer.pt").write_bytes(b"pretend pickle")
    with pytest.raises(ValueError, match=r"pickle file\(s\) \['optimizer\.pt'\]"):
        safe_load_adapter(tiny_clip(), tmp_path)
    batch = clip_batches(n=1)[0]
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_clip(), tmp_path), batch), logits(expected, batch))


def test_safe_load_refuses_other_adapter_types(tmp_path):
    get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"loads LoRSU, RLP and joint LoRSU\+RLP adapters; .* holds a LORA adapter"):
        safe_load_adapter(tiny_clip(), tmp_path)


def test_safe_load_fetches_only_safetensors_from_the_hub(tmp_path, monkeypatch):
    expected = save_rlp(tmp_path / "repo")
    (tmp_path / "repo" / "adapter_model.bin").write_bytes(b"pretend pickle")  # on the Hub, never fetched
    asked = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        asked.append(filename)
        cache = tmp_path / "cache"
        cache.mkdir(exist_ok=True)
        (cache / filename).write_bytes((tmp_path / "repo" / filename).read_bytes())
        return str(cache / filename)

    monkeypatch.setattr(peft_lorsu.loading, "hf_hub_download", fake_download)
    loaded = safe_load_adapter(tiny_clip(), "someone/clip-rlp")
    assert asked == ["adapter_config.json", "adapter_model.safetensors"]
    ids = ctx_prompts()
    assert torch.equal(pooled_features(loaded.get_text_features(input_ids=ids)),
                       pooled_features(expected.get_text_features(input_ids=ids)))  # fmt: skip


# -------------------------------------------------------------------------------------------- interrupted saves


def half_written_save_file(tensors, filename, metadata=None):
    """Stands in for safetensors' save_file: writes half of the file, then the process 'dies'."""
    data = __import__("safetensors.torch", fromlist=["save"]).save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    raise KeyboardInterrupt("interrupted while writing the weights")


def test_interrupted_save_pretrained_never_loads_as_another_adapter(tmp_path, monkeypatch):
    old = save_lorsu(tmp_path, seed=1)
    new = get_peft_model(tiny_clip(), LoRSUConfig(r=4, selection="random", init_weights=False, seed=2))

    # interrupted between the weights and the config: new weights next to the old config
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("interrupted before the config was written")

    with monkeypatch.context() as patch:
        patch.setattr(PeftConfigMixin, "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            new.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another save .*interrupted or concurrent save_pretrained"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)

    # interrupted while writing the weights: a truncated file
    old.save_pretrained(tmp_path)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_written_save_file)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_interrupted_atomic_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    old = get_peft_model(tiny_clip(), LoRSUConfig(r=4, selection="random", init_weights=False, seed=1))
    save_adapter_atomic(old, folder)
    (folder / "notes.txt").write_text("kept")
    batch = clip_batches(n=1)[0]
    expected = logits(old, batch)
    new = get_peft_model(tiny_clip(), LoRSUConfig(r=4, selection="random", init_weights=False, seed=2))

    with monkeypatch.context() as patch:
        patch.setattr(peft.peft_model, "safe_save_file", half_written_save_file)
        with pytest.raises(KeyboardInterrupt):
            save_adapter_atomic(new, folder)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging folder left behind
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_clip(), folder), batch), expected)

    (folder / "adapter_model.bin").write_bytes(b"stale pickle")  # an adapter file: never carried over
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy own notes.\n")
    save_adapter_atomic(new, folder)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    assert (folder / "notes.txt").read_text() == "kept"
    assert not (folder / "adapter_model.bin").exists()
    card = (folder / "README.md").read_text()
    assert "My own notes." in card and card.count("<!-- peft-lorsu:start -->") == 1
    assert torch.equal(logits(safe_load_adapter(tiny_clip(), folder), batch), logits(new, batch))
    with pytest.raises(ValueError, match="safetensors only"):
        save_adapter_atomic(new, folder, safe_serialization=False)


# ---------------------------------------------------------------------------------------------------- probe


def test_probe_failing_inside_loss_fn_at_batch_2_restores_the_model():
    model = tiny_clip()
    model.train()
    model.text_model.eval()
    model.logit_scale.grad = torch.full((), 3.0)
    model.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    before = snapshot(model)
    modes = [(n, m.training) for n, m in model.named_modules()]
    seen = []

    def loss_fn(m, batch):
        seen.append(len(seen))
        if len(seen) == 3:
            raise RuntimeError("loss failed at batch 2")
        return m(**batch, return_loss=True).loss

    with pytest.raises(RuntimeError, match="loss failed at batch 2"):
        probe_lorsu(model, LoRSUConfig(r=2, probe_samples=10**6), clip_batches(n=4), loss_fn=loss_fn,
                    show_progress=False)  # fmt: skip
    assert seen == [0, 1, 2]
    assert_untouched(model, before)
    assert modes == [(n, m.training) for n, m in model.named_modules()]
    assert torch.equal(model.logit_scale.grad, torch.full((), 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "logit_scale")
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def test_probe_names_the_layer_whose_gradient_turns_inf_at_batch_2():
    model = tiny_clip()
    before = snapshot(model)
    calls = []

    def loss_fn(m, batch):
        calls.append(None)
        hook = None
        if len(calls) == 3:
            fc1 = m.vision_model.encoder.layers[1].mlp.fc1
            hook = fc1.register_forward_hook(lambda mod, args, out: out.register_hook(lambda g: g * math.inf) and None)
        try:
            return m(**batch, return_loss=True).loss
        finally:
            if hook is not None:
                hook.remove()

    origin = r"hold NaN or inf; .* most likely started, is vision_model\.encoder\.layers\.1\.mlp\.fc1$"
    with pytest.raises(ValueError, match=origin):
        probe_lorsu(model, LoRSUConfig(r=2), clip_batches(n=3), loss_fn=loss_fn, num_batches=3, show_progress=False)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "data, loss_fn, num_batches, match",
    [
        (iter(()), None, None, "yielded no batches"),
        ([(torch.zeros(2, 3, 16, 16),)], None, None, r"batches must be dicts of model keyword arguments .* a tuple"),
        (clip_batches(n=1), lambda m, b: m(**b, return_loss=True).logits_per_image, None, r"scalar tensor, got a te"),
        (clip_batches(n=1), lambda m, b: 1.0, None, "loss_fn must return a scalar tensor, got float"),
        (clip_batches(n=1), None, 2.5, "num_batches must be an integer >= 1 or None, got 2.5"),
        (clip_batches(n=1), lambda m, b: m(**b, return_loss=True).loss.detach(), None, "no gradient path"),
    ],
    ids=["empty", "tuple-batch", "non-scalar", "not-a-tensor", "num-batches", "detached"],
)
def test_probe_refuses_bad_input_clearly(data, loss_fn, num_batches, match):
    model = tiny_clip()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        probe_lorsu(model, LoRSUConfig(r=2), data, loss_fn=loss_fn, num_batches=num_batches, show_progress=False)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------------------------ dtypes


def cpu_computes(dtype: torch.dtype) -> bool:
    try:
        return bool(torch.isfinite(torch.ones(4, 4, dtype=dtype) @ torch.ones(4, 4, dtype=dtype)).all())
    except RuntimeError:
        return False


DTYPES = [
    pytest.param(dtype, marks=pytest.mark.skipif(not cpu_computes(dtype), reason=f"no {dtype} matmul on this CPU"))
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1, torch.float16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_lorsu_keeps_the_base_dtype_through_merge(dtype, autocast_adapter_dtype):
    model = tiny_clip().to(dtype)
    config = LoRSUConfig(r=4, selection="random", init_weights=False)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    adapter_dtype = torch.float32 if autocast_adapter_dtype else dtype  # PEFT upcasts fp16 / bf16 adapters
    adapter = {n: p for n, p in peft_model.named_parameters() if "lorsu_" in n}
    assert adapter and all(p.dtype == adapter_dtype for p in adapter.values())
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clip_batches(n=1)[0].items()}
    adapted = logits(peft_model, batch)
    assert adapted.dtype == dtype and torch.isfinite(adapted).all()

    merged = peft_model.merge_and_unload()
    assert {p.dtype for p in merged.parameters()} == {dtype}
    torch.testing.assert_close(logits(merged, batch), adapted, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rlp_keeps_the_base_dtype_through_merge_and_fold(dtype):
    model = tiny_clip().to(dtype)
    peft_model = get_peft_model(model, RLPConfig(init_token_ids=CTX, rank=2, init_weights="gaussian", init_std=0.5))
    layer = next(m for m in peft_model.modules() if isinstance(m, RLPTextEmbedding))
    # PEFT's autocast_adapter_dtype (default True) keeps the adapter's tensors, P_fr included, in float32
    assert {layer.rlp_A["default"].dtype, layer.rlp_B["default"].dtype, layer.rlp_P_fr["default"].dtype} == {
        torch.float32
    }
    ids = ctx_prompts()
    adapted = pooled_features(peft_model.get_text_features(input_ids=ids))
    assert adapted.dtype == dtype and torch.isfinite(adapted).all()
    peft_model.merge_adapter()
    torch.testing.assert_close(pooled_features(peft_model.get_text_features(input_ids=ids)), adapted, atol=0, rtol=0)
    peft_model.unmerge_adapter()
    folded = peft_model.merge_and_unload(fold_into_position_embedding=True)
    assert {p.dtype for p in folded.parameters()} == {dtype}
    out = pooled_features(folded.get_text_features(input_ids=ids))
    torch.testing.assert_close(out, adapted, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 10)


def test_copying_a_config_keeps_no_folder_mark(tmp_path):
    """The folder mark is consumed by the first injection and never saved."""
    save_lorsu(tmp_path)
    config = LoRSUConfig.from_pretrained(tmp_path)
    assert "loaded_from" in vars(config) and "loaded_from" not in config.to_dict()
    get_peft_model(tiny_clip(), copy.copy(config))  # a copy carries the mark and is checked: it fits
    get_peft_model(tiny_clip(), config)
    assert "loaded_from" not in vars(config)
