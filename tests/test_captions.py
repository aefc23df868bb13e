"""Captioned data sets (issue #18): Fashion-MNIST captions from templates with measured attributes, held-out
paraphrases, and colour emoji rendered from Noto Color Emoji with their Unicode names."""

import itertools
import re
from collections import defaultdict

import pytest
import torch

from difflab.data.base import CaptionedData
from difflab.data.captions import (ATTRIBUTE_QUANTILES, ATTRIBUTE_THRESHOLDS, ATTRIBUTE_WORDS, ATTRIBUTES,
                                   CLASS_NAMES, HELD_OUT_NAMES, HELD_OUT_TEMPLATES, TRAIN_NAMES, TRAIN_TEMPLATES,
                                   attribute_words, caption_agreement, caption_for, fill_template,
                                   load_captioned_fashion_mnist, measure_attributes, parse_caption, phrase_pattern)
from difflab.data.fashion_mnist import load_fashion_mnist, locate
from difflab.errors import DifflabError


def fashion_mnist_present() -> bool:
    try:
        locate("test")
        return True
    except DifflabError:
        return False


needs_fashion_mnist = pytest.mark.skipif(not fashion_mnist_present(),
                                         reason="apt-get install dataset-fashion-mnist (.ci/run installs it)")
SUBSET = 2000                                   # test-split images checked caption by caption


@pytest.fixture(scope="module")
def captioned_test():
    return load_captioned_fashion_mnist("test")


# -- the vocabulary and the templates ---------------------------------------------------------------------------
def template_regex(template: str) -> re.Pattern:
    """A template as a regular expression over every name and attribute word it could be filled with."""
    names = sorted({n for names in TRAIN_NAMES + HELD_OUT_NAMES for n in names}, key=len, reverse=True)
    slots = {"a": "(?:a pair of|an|a)", "name": "(?:" + "|".join(map(re.escape, names)) + ")",
             **{attribute: "(?:" + "|".join(words) + ")" for attribute, words in ATTRIBUTE_WORDS.items()}}
    parts = re.split(r"\{(\w+)\}", template)            # literal, slot, literal, slot, ...
    return re.compile("".join(slots[p] if i % 2 else re.escape(p) for i, p in enumerate(parts)))


def matching_templates(caption: str, templates) -> list[str]:
    return [t for t in templates if template_regex(t).fullmatch(caption)]


def names_in(caption: str, names) -> list[str]:
    return [n for group in names for n in group if phrase_pattern(n).search(caption)]


def test_vocabulary_covers_every_class_and_held_out_names_are_new():
    assert len(TRAIN_NAMES) == len(HELD_OUT_NAMES) == len(CLASS_NAMES)
    assert all(2 <= len(names) <= 3 for names in TRAIN_NAMES) and all(HELD_OUT_NAMES)
    for held_out in (n for names in HELD_OUT_NAMES for n in names):
        assert not names_in(held_out, TRAIN_NAMES), held_out            # no training name inside a paraphrase
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)


def test_captions_are_deterministic_and_seeded_by_the_image():
    words = {"brightness": "dark", "fill": "large", "pattern": "plain"}
    assert caption_for(0, 7, words, "train") == "a dark sneaker"              # golden: seeds must not drift
    assert caption_for(0, 7, words, "train", held_out=True) == "this is a large running shoe"
    assert caption_for(5, 7, words, "train") == caption_for(5, 7, words, "train")
    assert len({caption_for(i, 7, words, "train") for i in range(50)}) > 5
    assert any(caption_for(i, 7, words, "train") != caption_for(i, 7, words, "test") for i in range(10))


@needs_fashion_mnist
def test_loader_gives_each_image_its_seeded_caption(captioned_test):
    data = captioned_test
    assert data.images.shape == (10000, 1, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and len(data.captions) == 10000 and data.class_names == CLASS_NAMES
    assert set(data.attributes) == set(ATTRIBUTES) and all(v.shape == (10000,) for v in data.attributes.values())
    words = attribute_words(data.attributes, data.labels)
    assert all(data.captions[i] == caption_for(i, data.labels[i].item(), words[i], "test") for i in range(SUBSET))
    native = load_fashion_mnist("test", image_size=32)
    assert torch.equal(data.images, native.data) and torch.equal(data.labels, native.labels)


@needs_fashion_mnist
def test_train_captions_use_only_training_vocabulary_and_held_out_only_held_out(captioned_test):
    data = captioned_test
    words = attribute_words(data.attributes, data.labels)
    for i in range(SUBSET):
        label = data.labels[i].item()
        train, held_out = caption_for(i, label, words[i], "train"), caption_for(i, label, words[i], "train", True)
        assert len(matching_templates(train, TRAIN_TEMPLATES)) >= 1, train
        assert not matching_templates(train, HELD_OUT_TEMPLATES), train
        assert names_in(train, TRAIN_NAMES) and not names_in(train, HELD_OUT_NAMES), train
        assert len(matching_templates(held_out, HELD_OUT_TEMPLATES)) >= 1, held_out
        assert not matching_templates(held_out, TRAIN_TEMPLATES), held_out
        assert names_in(held_out, HELD_OUT_NAMES) and not names_in(held_out, TRAIN_NAMES), held_out


def test_parse_caption_round_trips_every_template_class_and_attribute_word():
    combinations = [dict(zip(ATTRIBUTES, ws)) for ws in itertools.product(*(ATTRIBUTE_WORDS[a] for a in ATTRIBUTES))]
    for held_out, (templates, vocabulary) in enumerate([(TRAIN_TEMPLATES, TRAIN_NAMES),
                                                       (HELD_OUT_TEMPLATES, HELD_OUT_NAMES)]):
        for template, (label, names), words in itertools.product(templates, enumerate(vocabulary), combinations):
            for name in names:
                caption = fill_template(template, name, words)
                parsed = parse_caption(caption)
                stated = {a: words[a] if "{" + a + "}" in template else None for a in ATTRIBUTES}
                assert parsed == {"label": label, "name": name, "held_out": bool(held_out), **stated}, caption


def test_parse_caption_reads_class_names_and_says_none_when_unsaid():
    assert parse_caption("A photo of an Ankle boot")["label"] == 9
    assert parse_caption("a t-shirt")["label"] == 0 and parse_caption("a shirt")["label"] == 6
    assert parse_caption("a dark Trouser")["label"] == 1
    assert parse_caption("a light jumper") == {"label": 2, "name": "jumper", "held_out": True,
                                               "brightness": "light", "fill": None, "pattern": None}
    assert parse_caption("a red car") == {"label": None, "name": None, "held_out": None,
                                          "brightness": None, "fill": None, "pattern": None}


# -- the attributes ------------------------------------------------------------------------------------------------
@needs_fashion_mnist
def test_caption_words_agree_with_the_measured_attributes(captioned_test):
    data = captioned_test.subset(range(SUBSET))
    measured = attribute_words(measure_attributes(data.images), data.labels)       # again, from the 32x32 images
    for caption, label, words in zip(data.captions, data.labels.tolist(), measured):
        parsed = parse_caption(caption)
        assert parsed["label"] == label
        assert all(parsed[a] in (None, words[a]) for a in ATTRIBUTES), (caption, words)
    as_float = data.images.float() / 127.5 - 1                                     # a sampler's [-1, 1] output
    assert caption_agreement(as_float, data.captions) == {a: 1.0 for a in ATTRIBUTES}
    dimmed = (data.images.float() * 0.4).round().to(torch.uint8)
    assert caption_agreement(dimmed, data.captions)["brightness"] < 0.6


def test_attributes_measure_what_the_words_say():
    plain = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    plain[..., 6:22, 6:22] = 200
    striped = plain.clone()
    striped[..., 6:22:2, 6:22] = 60
    small = torch.zeros_like(plain)
    small[..., 10:18, 10:18] = 200
    attributes = measure_attributes(torch.cat([plain, striped, small]))
    assert attributes["brightness"][0].item() == pytest.approx(200 / 255)
    assert attributes["brightness"][1] < attributes["brightness"][0]
    assert attributes["fill"][0].item() == pytest.approx(16 * 16 / 28 ** 2)
    assert attributes["fill"][1] == attributes["fill"][0] > attributes["fill"][2]
    assert attributes["pattern"][0].item() == pytest.approx(0.0)
    assert attributes["pattern"][1].item() > 0.1
    with pytest.raises(DifflabError, match="grey images"):
        measure_attributes(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


@needs_fashion_mnist
def test_attribute_thresholds_match_the_training_split():
    """The stored cut points are the training split's per-class quantiles: on 12000 training images each
    cut has its quantile's share of the class below it (to 0.05; ~1200 images a class)."""
    train = load_fashion_mnist("train", image_size=28)
    images, labels = train.data[:12000], train.labels[:12000]
    measured = measure_attributes(images)
    for name in ATTRIBUTES:
        for c in range(len(CLASS_NAMES)):
            values = measured[name][labels == c]
            for cut, quantile in zip(ATTRIBUTE_THRESHOLDS[name][c], ATTRIBUTE_QUANTILES[name]):
                share = (values <= cut).float().mean().item()
                assert share == pytest.approx(quantile, abs=0.05), (name, CLASS_NAMES[c], cut, share)


@needs_fashion_mnist
def test_every_class_has_every_word_in_the_test_split(captioned_test):
    words = attribute_words(captioned_test.attributes, captioned_test.labels)
    counts = defaultdict(int)
    for label, w in zip(captioned_test.labels.tolist(), words):
        for name in ATTRIBUTES:
            counts[label, name, w[name]] += 1
    for label, name in itertools.product(range(len(CLASS_NAMES)), ATTRIBUTES):
        for word in ATTRIBUTE_WORDS[name]:
            assert counts[label, name, word] >= 100, (CLASS_NAMES[label], name, word)


@needs_fashion_mnist
def test_held_out_loader_and_conversion_to_training_data():
    held_out = load_captioned_fashion_mnist("test", image_size=28, held_out=True).subset(range(300))
    assert held_out.images.shape == (300, 1, 28, 28) and held_out.name.endswith("held-out")
    assert all(parse_caption(c)["held_out"] is True for c in held_out.captions)
    data = held_out.as_captioned_data()
    assert isinstance(data, CaptionedData) and data.captions == tuple(held_out.captions) and len(data) == 300


# -- emoji ---------------------------------------------------------------------------------------------------------
EMOJI_LIMIT = 50


@pytest.fixture(scope="module")
def emoji_module():
    pytest.importorskip("emoji")
    from difflab.data import emoji_set
    if not emoji_set.FONT_PATH.is_file():
        pytest.skip(f"apt-get install {emoji_set.FONT_PACKAGE}")
    return emoji_set


@pytest.fixture(scope="module")
def emoji_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emoji-cache")


@pytest.fixture(scope="module")
def emoji_splits(emoji_module, emoji_cache):
    return {split: emoji_module.load_emoji_set(split, limit=EMOJI_LIMIT, cache_dir=emoji_cache)
            for split in ("train", "test")}


def test_emoji_split_is_disjoint_by_name(emoji_splits):
    train, test = emoji_splits["train"], emoji_splits["test"]
    assert len(train) > 0 and len(test) > 0 and len(train) + len(test) <= EMOJI_LIMIT
    assert train.class_names == test.class_names
    train_names = {train.class_names[i] for i in train.labels.tolist()}
    test_names = {test.class_names[i] for i in test.labels.tolist()}
    assert len(train_names) == len(train) and len(test_names) == len(test) and not train_names & test_names


def test_emoji_images_are_rgb_32_not_blank_and_captioned_with_their_names(emoji_splits, emoji_module):
    for data in emoji_splits.values():
        assert data.images.shape[1:] == (3, 32, 32) and data.images.dtype == torch.uint8
        flat = data.images.flatten(1).float()
        assert (flat.std(1) > 10).all() and ((flat < 200).float().mean(1) > 0.02).all()   # drawn on white
        for caption, label in zip(data.captions, data.labels.tolist()):
            assert data.class_names[label] in caption
            assert caption == emoji_module.emoji_caption(data.class_names[label])


def test_emoji_cache_is_written_once_and_read_back(emoji_splits, emoji_module, emoji_cache, monkeypatch):
    assert len(list(emoji_cache.glob("emoji-32px-*.npz"))) == 1
    monkeypatch.setattr(emoji_module, "render_all", lambda *a: pytest.fail("rendered again despite the cache"))
    again = emoji_module.load_emoji_set("test", limit=EMOJI_LIMIT, cache_dir=emoji_cache)
    assert torch.equal(again.images, emoji_splits["test"].images) and again.captions == emoji_splits["test"].captions


def test_skin_tone_variants_share_a_split_of_about_a_tenth(emoji_module):
    names = [name for _, name in emoji_module.candidate_emoji()]
    splits = defaultdict(set)
    for name in names:
        splits[emoji_module.base_name(name)].add(emoji_module.emoji_split(name))
    assert all(len(s) == 1 for s in splits.values())
    assert 0.07 < sum(s == {"test"} for s in splits.values()) / len(splits) < 0.13
    assert emoji_module.base_name("handshake light skin tone medium-dark skin tone") == "handshake"
    assert emoji_module.emoji_name("\U0001F1EB\U0001F1F7", ":France:") == "flag of France"


def test_missing_emoji_font_is_one_clear_error(emoji_module, tmp_path):
    missing = tmp_path / "NotoColorEmoji.ttf"
    with pytest.raises(DifflabError) as error:
        emoji_module.load_emoji_set("train", limit=5, font_path=missing, cache_dir=None)
    message = str(error.value)
    assert "\n" not in message and str(missing) in message and "fonts-noto-color-emoji" in message
