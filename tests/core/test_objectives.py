"""Objectives: prompts, logits, losses, accuracy and base-to-new helpers, checked against hand-computed numbers."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from peft_lorsu.objectives import (  # noqa: E402
    BaseToNewResult,
    ClassifierOutput,
    ZeroShotClassifier,
    base_to_new_split,
    build_class_prompts,
    class_cross_entropy,
    class_logits,
    clip_contrastive_loss,
    evaluate_base_to_new,
    harmonic_mean,
    zero_shot_accuracy,
)

LOG2 = math.log(2)


class FakeClip(nn.Module):
    """A CLIP stand-in with known features: text feature of a prompt = row ``input_ids[c, 0]`` of ``table``; image
    feature = the pixel values themselves `(B, D)`; ``logit_scale = log(s)``. Counts text-tower calls."""

    def __init__(self, table: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.text_model = nn.Embedding.from_pretrained(table, freeze=True)
        self.text_projection = nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=False)
        self.text_calls = 0

    def get_text_features(self, input_ids, attention_mask=None):
        self.text_calls += 1
        return BaseModelOutputWithPooling(pooler_output=self.text_model(input_ids[:, 0]))

    def get_image_features(self, pixel_values):
        return BaseModelOutputWithPooling(pooler_output=pixel_values)


# 4 classes with orthogonal text features in 4-d
TABLE = torch.eye(4)
PROMPTS = {"input_ids": torch.tensor([[0], [1], [2], [3]])}


def images(rows: list[list[float]], labels: list[int]) -> list[dict]:
    return [{"pixel_values": torch.tensor(rows, dtype=torch.float32), "labels": torch.tensor(labels)}]


def test_build_class_prompts():
    assert build_class_prompts(["cat", "sea_lion"]) == ["a photo of a cat.", "a photo of a sea lion."]
    assert build_class_prompts(["cat"], init_text="X X X X") == ["X X X X cat."]
    assert build_class_prompts(["sea_lion"], replace_underscores=False) == ["a photo of a sea_lion."]
    assert build_class_prompts(["cat"], template="itap of a {classname}") == ["itap of a cat"]
    with pytest.raises(ValueError, match="class_names is empty"):
        build_class_prompts([])


def test_class_logits_hand_computed():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    expected = torch.tensor([[10.0, 10 / math.sqrt(2)], [0.0, 10 / math.sqrt(2)]])
    assert torch.allclose(class_logits(image, text, 10.0), expected)


def test_clip_contrastive_loss_hand_computed():
    eye = torch.eye(2)
    # s = 1, matched pairs: every row's CE is -log(e / (e + 1)) = log(1 + 1/e)
    assert clip_contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # both texts equal to image 0: image->text rows are [1, 1] and [0, 0] -> log 2 each;
    # text->image rows are [1, 0] (target 0) and [1, 0] (target 1) -> log(1 + 1/e) and log(1 + e)
    texts = torch.tensor([[2.0, 0.0], [5.0, 0.0]])  # norms do not matter
    expected = (LOG2 + (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2) / 2
    assert clip_contrastive_loss(eye, texts, 1.0).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="pair row by row, got 2 and 3 rows"):
        clip_contrastive_loss(eye, torch.ones(3, 2), 1.0)


def test_clip_contrastive_loss_matches_clip_model():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=20,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 8, 1], [0, 9, 3, 1]])
    pixels = torch.randn(3, 3, 16, 16)
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
    ours = clip_contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale.exp())
    assert torch.allclose(ours, out.loss, atol=1e-6)
    # and the zero-shot head gives CLIP's own logits_per_image
    classifier = ZeroShotClassifier(model, ids)
    assert torch.allclose(classifier(pixels).logits, out.logits_per_image, atol=1e-5)


def test_class_cross_entropy_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    labels = torch.tensor([1, 0])
    # -log(3/4) and -log(1/2)
    per_item = [-math.log(0.75), LOG2]
    assert class_cross_entropy(logits, labels).item() == pytest.approx(sum(per_item) / 2)
    assert class_cross_entropy({"logits": logits}, labels).item() == pytest.approx(sum(per_item) / 2)
    assert class_cross_entropy(ClassifierOutput(logits=logits), labels, num_items_in_batch=4).item() == pytest.approx(
        sum(per_item) / 4
    )
    # a CLIPModel output over the class prompts works too
    assert class_cross_entropy({"logits_per_image": logits}, labels).item() == pytest.approx(sum(per_item) / 2)
    # -100 is ignored
    assert class_cross_entropy(logits, torch.tensor([1, -100])).item() == pytest.approx(-math.log(0.75))


def test_harmonic_mean_and_split():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.8 * 0.6 / 1.4)
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(1.0, 0.0) == 0.0
    assert base_to_new_split(5) == ([0, 1, 2], [3, 4])
    assert base_to_new_split(4) == ([0, 1], [2, 3])
    assert base_to_new_split(["cat", "dog", "owl"]) == (["cat", "dog"], ["owl"])
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        base_to_new_split(1)
    assert str(BaseToNewResult(0.5, 0.25, 1 / 3)) == "base 50.00 / new 25.00 / H 33.33"


def test_zero_shot_accuracy_hand_computed():
    model = FakeClip(TABLE).train()
    # predictions: 0, 1, 2, 0 (the last image is closest to class 0 but labelled 3)
    loader = images([[1, 0, 0, 0], [0.1, 1, 0, 0], [0, 0, 2, 1], [1, 0, 0, 0.5]], [0, 1, 2, 3])
    assert zero_shot_accuracy(model, loader, PROMPTS) == pytest.approx(3 / 4)
    assert model.training  # restored
    # among classes {2, 3} only the images labelled 2 and 3 count; image 3 now picks class 3 over class 2
    assert zero_shot_accuracy(model, loader, PROMPTS, classes=[2, 3]) == pytest.approx(1.0)
    # among {0, 3}: image 0 -> 0 (right), image 3 -> 0 (wrong)
    assert zero_shot_accuracy(model, loader, PROMPTS, classes=[0, 3]) == pytest.approx(1 / 2)
    # tuple batches work too
    assert zero_shot_accuracy(model, [(loader[0]["pixel_values"], loader[0]["labels"])], PROMPTS) == pytest.approx(
        3 / 4
    )
    with pytest.raises(ValueError, match="no images of the requested classes"):
        zero_shot_accuracy(model, images([[1, 0, 0, 0]], [0]), PROMPTS, classes=[3])
    with pytest.raises(ValueError, match=r"indices in \[0, 4\)"):
        zero_shot_accuracy(model, loader, PROMPTS, classes=[4])
    with pytest.raises(ValueError, match="pass a tokenizer"):
        zero_shot_accuracy(model, loader, ["a photo of a cat."])


def test_evaluate_base_to_new_hand_computed():
    model = FakeClip(TABLE)
    # base = {0, 1}, new = {2, 3}
    loader = images(
        [[1, 0, 0, 0], [1, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0.5], [0, 0, 0.2, 1]],
        [0, 1, 2, 3, 3],
    )
    result = evaluate_base_to_new(model, loader, PROMPTS)
    # base: image 0 right, image 1 (labelled 1, closer to 0) wrong -> 1/2; new: 2 right, 3 wrong, 4 right -> 2/3
    assert result.base_accuracy == pytest.approx(1 / 2)
    assert result.new_accuracy == pytest.approx(2 / 3)
    assert result.harmonic_mean == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))


class StringTokenizer:
    """Maps each prompt to one id, the index of its class name in `names`."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, prompts, padding=True, return_tensors="pt"):
        ids = [[next(i for i, n in enumerate(self.names) if n in p)] for p in prompts]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), 1, dtype=torch.long)}


def test_string_prompts_with_tokenizer():
    names = ["cat", "dog", "owl", "fox"]
    model = FakeClip(TABLE)
    tokenizer = StringTokenizer(names)
    loader = images([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], [0, 1, 3])
    assert zero_shot_accuracy(model, loader, build_class_prompts(names), tokenizer) == 1.0
    assert evaluate_base_to_new(model, loader, build_class_prompts(names), tokenizer).harmonic_mean == 1.0
    classifier = ZeroShotClassifier.from_class_names(model, tokenizer, names)
    assert classifier.num_classes == 4 and classifier.input_ids[:, 0].tolist() == [0, 1, 2, 3]


def test_classifier_logits_and_loss():
    model = FakeClip(TABLE, scale=2.0)
    classifier = ZeroShotClassifier(model, PROMPTS["input_ids"])
    out = classifier(torch.tensor([[3.0, 4.0, 0.0, 0.0]]), labels=torch.tensor([1]))
    assert torch.allclose(out.logits, torch.tensor([[1.2, 1.6, 0.0, 0.0]]))  # 2 * cos
    expected = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6) + 2))
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


def test_classifier_computes_text_features_every_forward_unless_fixed():
    model = FakeClip(TABLE)
    classifier = ZeroShotClassifier(model, PROMPTS["input_ids"])
    pixels = torch.eye(4)
    classifier(pixels)
    classifier(pixels)
    assert model.text_calls == 2 and classifier.fixed is None
    expected = classifier(pixels).logits
    with classifier.fixed_text_features() as fixed:
        assert fixed.shape == (4, 4) and not fixed.requires_grad
        for _ in range(3):
            torch.testing.assert_close(classifier(pixels).logits, expected)
        assert model.text_calls == 4  # one computation for the whole block
        with torch.no_grad():
            model.text_model.weight[0, 1] += 1.0  # the caller promised no change: the fixed features stay
        torch.testing.assert_close(classifier(pixels).logits, expected)
    assert classifier.fixed is None
    changed = classifier(pixels).logits  # released: the update is seen again
    assert model.text_calls == 5 and not torch.allclose(changed, expected)


def test_fixed_text_features_are_released_on_error():
    classifier = ZeroShotClassifier(FakeClip(TABLE), PROMPTS["input_ids"])
    with pytest.raises(RuntimeError, match="boom"), classifier.fixed_text_features():
        raise RuntimeError("boom")
    assert classifier.fixed is None


def test_classifier_rejects_non_clip():
    with pytest.raises(TypeError, match="missing get_text_features, get_image_features, logit_scale"):
        ZeroShotClassifier(nn.Linear(2, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(num_classes, length\)"):
        ZeroShotClassifier(FakeClip(TABLE), torch.zeros(4, dtype=torch.long))
