"""Real-data foundation: tokenizer asset, loaders, CLIP pixel / caption helpers, packaged demo data and checkpoint.

Everything here runs offline in seconds on the files shipped in ``peft_lorsu/assets``; tests of the optional
system datasets (Fashion-MNIST from apt, Animal-MNIST and scikit-learn from PyPI) skip when they are missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_lorsu.app import data as D  # noqa: E402
from peft_lorsu.app import inputs  # noqa: E402
from peft_lorsu.app.models import load_clip  # noqa: E402
from peft_lorsu.trainer import ImageTextCollator  # noqa: E402

ASSETS = Path(D.__file__).resolve().parents[1] / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"
MINI_CLIP = ASSETS / "mini-clip"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]

needs_fashion = pytest.mark.skipif(
    not (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist, or scripts/install_data.sh)",
)
needs_animal = pytest.mark.skipif(
    importlib.util.find_spec("animal_mnist") is None,
    reason="Animal-MNIST not installed (pip install --no-deps animal-mnist==0.4, or scripts/install_data.sh)",
)
needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="handwritten digits need scikit-learn"
)
needs_checkpoint = pytest.mark.skipif(
    not (MINI_CLIP / "model.safetensors").is_file(), reason="mini-clip checkpoint not built yet"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


# ---- tokenizer


def test_clip_tokenizer_matches_openai_ids(tokenizer):
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == CAT_IDS
    assert tokenizer.model_max_length == 77
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


@needs_checkpoint
def test_mini_clip_tokenizer_has_short_context():
    """The mini-CLIP ships no tokenizer of its own: load_clip gives it the packaged one, cut to its 32 positions."""
    assert not (MINI_CLIP / "vocab.json").exists()
    _, tok = load_clip(str(MINI_CLIP))
    assert tok("a photo of a cat")["input_ids"] == CAT_IDS
    assert tok.model_max_length == 32
    long = tok(" ".join(["cat"] * 100), truncation=True)["input_ids"]
    assert len(long) == 32 and long[-1] == 49407


# ---- demo data


@pytest.mark.parametrize(
    ("split", "count", "first_class"),
    [("target_train", 150, "zero"), ("target_test", 200, "zero"), ("control", 200, "t-shirt")],
)
def test_demo_splits_shapes_and_labels(split, count, first_class):
    data = D.load_demo(split)
    assert data.images.shape == (count, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.shape == (count,) and data.labels.dtype == torch.int64
    assert len(data.class_names) == 10 and data.class_names[0] == first_class
    assert torch.bincount(data.labels, minlength=10).tolist() == [count // 10] * 10
    # real images: dark background, bright strokes, not constant
    assert data.images[:, 0, 0].float().mean() < 30 and int(data.images.max()) > 200
    assert data.images.float().std() > 40


def test_demo_rejects_unknown_split():
    with pytest.raises(ValueError, match="split='val'.*'target_train'"):
        D.load_demo("val")


def test_demo_file_has_no_pickle():
    raw = (ASSETS / "demo" / "demo.safetensors").read_bytes()
    assert raw[8:9] == b"{"  # safetensors: 8-byte header length, then a JSON header
    assert not any(p.suffix in {".pkl", ".pickle", ".pt", ".bin", ".npy"} for p in ASSETS.rglob("*"))


# ---- transforms


def test_pixel_values_shape_and_normalisation():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[:, :14] = 255
    pixels = inputs.to_pixel_values(images)
    assert pixels.shape == (4, 3, 28, 28) and pixels.dtype == torch.float32
    mean, std = torch.tensor(inputs.CLIP_MEAN), torch.tensor(inputs.CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 20, 0], -mean / std)  # black
    torch.testing.assert_close(pixels[0, :, 0, 0], (1 - mean) / std)  # white
    assert inputs.to_pixel_values(images[0]).shape == (1, 3, 28, 28)
    big = inputs.to_pixel_values(images, image_size=224)
    assert big.shape == (4, 3, 224, 224)
    torch.testing.assert_close(big[0, :, 0, 0], (1 - mean) / std)


def test_pixel_values_reject_float_images():
    with pytest.raises(ValueError, match="uint8"):
        inputs.to_pixel_values(torch.zeros(2, 28, 28))


@needs_checkpoint
def test_pixel_values_match_saved_image_processor():
    from PIL import Image
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(str(MINI_CLIP))
    images = D.load_demo("control").images[:3]
    theirs = processor(images=[Image.fromarray(im.numpy(), mode="L") for im in images], return_tensors="pt")
    torch.testing.assert_close(theirs["pixel_values"], inputs.to_pixel_values(images), atol=1e-5, rtol=0)


def test_shift_domain_kinds():
    images = D.load_demo("control").images[:8]
    assert torch.equal(D.shift_domain(images, "inverted"), 255 - images)
    rotated = D.shift_domain(images, "rotated")
    assert torch.equal(rotated, torch.rot90(images, 1, dims=(1, 2)))
    assert torch.equal(D.shift_domain(rotated, "rotated", angle=270), images)
    # an arbitrary angle goes through interpolation but keeps shape, dtype and most of the ink
    tilted = D.shift_domain(images, "rotated", angle=30)
    assert tilted.shape == images.shape and tilted.dtype == torch.uint8
    assert 0.8 < tilted.float().sum() / images.float().sum() < 1.05
    low = D.shift_domain(images, "low_contrast", contrast=0.3)
    assert int(low.min()) >= 89 and int(low.max()) <= 166
    assert low.float().std().item() == pytest.approx(0.3 * images.float().std().item(), rel=0.02)
    with pytest.raises(ValueError, match="kind='blurred'"):
        D.shift_domain(images, "blurred")


def test_stratified_split_partitions_each_class():
    labels = torch.arange(10).repeat_interleave(20)
    train, test = D.stratified_split(labels, 0.25, seed=3)
    assert len(train) == 150 and len(test) == 50
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(200))
    assert torch.bincount(labels[test]).tolist() == [5] * 10
    train2, _ = D.stratified_split(labels, 0.25, seed=3)
    assert torch.equal(train, train2)


def test_concat_offsets_labels():
    a = D.load_demo("control")
    b = D.load_demo("target_test")
    both = D.concat_labeled(a, b)
    assert both.class_names == a.class_names + b.class_names
    assert torch.equal(both.labels[len(a.labels) :], b.labels + 10)
    assert int(both.labels.max()) == 19


def test_fill_template_articles():
    assert inputs.fill_template("a photo of a {}.", "elephant") == "a photo of an elephant."
    assert inputs.fill_template("a photo of a {}.", "ankle boot") == "a photo of an ankle boot."
    assert inputs.fill_template("a photo of a {}.", "cat") == "a photo of a cat."


def test_captioned_images_batch_through_the_core_collator(tokenizer):
    data = D.load_demo("control")
    items = [inputs.CaptionedImages(data, seed=0)[i] for i in range(0, 200, 25)]
    batch = ImageTextCollator(tokenizer)(items)
    assert batch["pixel_values"].shape == (8, 3, 28, 28)
    torch.testing.assert_close(batch["pixel_values"], inputs.to_pixel_values(data.images[0:200:25]))
    assert [item["label"] for item in items] == data.labels[0:200:25].tolist()
    assert batch["return_loss"] is True
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 8 and (ids[:, 0] == 49406).all()
    assert (ids == 49407).any(dim=1).all() and int(mask.sum(dim=1).max()) == ids.shape[1]
    for row, m, item in zip(ids, mask, items, strict=True):
        text = tokenizer.decode(row[m.bool()], skip_special_tokens=True).replace(" .", ".")
        assert text == item["caption"]
        assert text in {inputs.fill_template(t, data.class_names[item["label"]]) for t in inputs.CAPTION_TEMPLATES}
    again = [inputs.CaptionedImages(data, seed=0)[i]["caption"] for i in range(0, 200, 25)]
    assert again == [item["caption"] for item in items]  # seeded
    assert again != [inputs.CaptionedImages(data, seed=1)[i]["caption"] for i in range(0, 200, 25)]


def test_dispatcher_errors_name_the_field():
    with pytest.raises(ValueError, match="source must be one of"):
        D.load_image_dataset("not_a_dataset")
    with pytest.raises(ValueError, match="split='dev'"):
        D.load_image_dataset("digits", "dev")


# ---- Animal-MNIST pickles


def test_animal_file_with_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / "animal_data_version_3.gz"
    fake.write_bytes(gzip.compress(pickle.dumps([1, 2, 3])))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        D._load_verified_array(fake)


def test_numpy_only_unpickler_refuses_other_globals():
    with pytest.raises(pickle.UnpicklingError, match="refusing to load collections.OrderedDict"):
        D._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1)))).load()


# ---- optional sources


@needs_fashion
def test_fashion_mnist_from_debian_package():
    test = D.load_fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert len(D.load_fashion_mnist("train").labels) == 60000
    offline_alias = D.load_image_dataset("zalando-datasets/fashion_mnist", "test")
    assert torch.equal(offline_alias.images, test.images)


@needs_animal
def test_animal_mnist_split():
    train, test = D.load_animal_mnist("train"), D.load_animal_mnist("test")
    assert train.images.shape == (8000, 28, 28) and test.images.shape == (2000, 28, 28)
    assert torch.bincount(test.labels).tolist() == [200] * 10
    assert test.class_names[-1] == "zebra"


@needs_sklearn
def test_digits_loader():
    train, test = D.load_digits("train"), D.load_digits("test")
    assert len(train.labels) + len(test.labels) == 1797
    assert test.images.shape[1:] == (28, 28) and test.images.dtype == torch.uint8
    assert int(test.images[:, :3].max()) == 0  # 4-pixel black frame around the 20x20 digit (MNIST layout)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="HF datasets not installed")
def test_hub_dataset_conversion(monkeypatch):
    import datasets as hf
    import numpy as np
    from PIL import Image

    rows = {
        "image": [Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)) for i in range(4)],
        "label": [0, 1, 1, 0],
    }
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["left", "right"])})
    monkeypatch.setattr(hf, "load_dataset", lambda name, split: hf.Dataset.from_dict(rows, features=features))
    data = D.load_hub_dataset("someone/tiny", "train")
    assert data.images.shape == (4, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 1, 0] and data.class_names == ["left", "right"]
    assert data.images[:, 10, 10].tolist() == [0, 40, 80, 120]


# ---- checkpoint


@needs_checkpoint
def test_mini_clip_checkpoint_loads_offline_and_classifies():
    from transformers import CLIPModel, CLIPTokenizer

    assert (MINI_CLIP / "model.safetensors").stat().st_size < 17 * 2**20
    model = CLIPModel.from_pretrained(str(MINI_CLIP)).eval()
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    assert model.dtype == torch.float32
    assert model.config.vision_config.num_attention_heads == 8 and model.config.projection_dim == 64
    control = D.load_demo("control")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.to_pixel_values(control.images)).pooler_output
        prompts = [inputs.fill_template("a photo of a {}.", c) for c in control.class_names]
        text = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt")).pooler_output
    assert image.shape == (200, 64) and text.shape == (10, 64)
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    pred = (torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T).argmax(1)
    assert (pred == control.labels).float().mean() > 0.6  # Fashion-MNIST: known classes
