"""Captioned Fashion-MNIST for text-to-image (issue #18): captions that say more than the class.

Each image's caption names its class and some of three attributes measured on the image itself:

- ``brightness``: mean intensity (in [0, 1]) of the garment's pixels, those above ``GARMENT_LEVEL`` (16 of 255);
- ``fill``: the fraction of the 28x28 frame inside the garment's silhouette (the above-threshold pixels, closed
  by a 3x3 element and with enclosed holes filled, so a dark print does not make a garment "small");
- ``pattern``: mean absolute high-pass (the image minus its 3x3 box blur) over the silhouette eroded by two
  pixels (by one where two leaves nothing), so stripes, checks and prints count and the silhouette's own edge
  does not. For thin items (sandal straps, trouser legs) the interior is small and the edge still shows.

Each is cut into words at quantiles of the TRAINING split, separately per class, so every class has every
word: ``dark`` / ``grey`` / ``light`` at the class's tertiles of brightness, ``small`` / ``large`` at its
median fill, ``plain`` / ``patterned`` at its 3/4 quantile of pattern (a quarter of each class is patterned).
The cut points are the constants ``ATTRIBUTE_THRESHOLDS``; ``compute_attribute_thresholds`` recomputes them
(``python -m difflab.data.captions`` prints them from the training split) and a test checks they still fit.
``measure_attributes`` takes generated images too (uint8 or [-1, 1] floats, at 28x28 or in a padded or
resized 32x32 frame), so ``caption_agreement`` checks a model's images against the captions that made them.

The caption grammar: a template with the slots ``{a}`` (the article of the noun phrase that follows: "a",
"an" before a vowel, "a pair of" before a plural name such as "trousers"), ``{name}`` (a synonym of the class)
and ``{brightness}``, ``{fill}``, ``{pattern}`` (attribute words). Training captions draw names from
``TRAIN_NAMES`` and templates from ``TRAIN_TEMPLATES``; held-out captions (``held_out=True``: paraphrases
never seen in training, "running shoe" for sneaker) draw only from ``HELD_OUT_NAMES`` and
``HELD_OUT_TEMPLATES``. The attribute words are the same in both. The choice is seeded by the split and the
image's index, so an image always gets the same caption. ``parse_caption`` reads the class and the attribute
words back from any caption in either vocabulary (or with the class's own name, "trouser"). The templates
are in the manner of CLIP's prompt templates (Radford et al. 2021, "a photo of a {label}.").
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from difflab.data.base import CaptionedData
from difflab.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist, resize_images
from difflab.errors import DifflabError

NATIVE_SIZE = 28                    # Fashion-MNIST's frame, in which the attributes are measured
GARMENT_LEVEL = 16                  # of 255: brighter pixels are the garment's (the background is 0)

ATTRIBUTES = ("brightness", "fill", "pattern")
ATTRIBUTE_WORDS = {"brightness": ("dark", "grey", "light"), "fill": ("small", "large"),
                   "pattern": ("plain", "patterned")}
ATTRIBUTE_QUANTILES = {"brightness": (1 / 3, 2 / 3), "fill": (0.5,), "pattern": (0.75,)}

# Per class (in CLASS_NAMES order), the cut points between the words above: the quantiles of the training
# split's 60000 images. Recompute with ``python -m difflab.data.captions``.
ATTRIBUTE_THRESHOLDS = {      # T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot
    "brightness": ((0.5161, 0.7199), (0.6233, 0.7437), (0.5215, 0.7367), (0.5904, 0.7539), (0.6501, 0.7659),
                   (0.4543, 0.5541), (0.4554, 0.6828), (0.5115, 0.6116), (0.6176, 0.7232), (0.6499, 0.7312)),
    "fill": ((0.5676,), (0.3546,), (0.648,), (0.412,), (0.5957,), (0.2934,), (0.6327,), (0.3227,), (0.5995,),
             (0.4541,)),
    "pattern": ((0.078,), (0.1563,), (0.0989,), (0.1021,), (0.0879,), (0.1558,), (0.0965,), (0.1366,), (0.0824,),
                (0.0811,)),
}

# Class synonyms, per class in CLASS_NAMES order. No held-out name holds a training name as a whole word.
TRAIN_NAMES = (("t-shirt", "tee", "top"), ("trousers", "pants"), ("pullover", "sweater"), ("dress", "frock"),
               ("coat", "jacket"), ("sandal", "strappy sandal"), ("shirt", "button-up shirt"),
               ("sneaker", "trainer"), ("bag", "handbag"), ("ankle boot", "boot"))
HELD_OUT_NAMES = (("jersey",), ("jeans", "slacks"), ("jumper",), ("gown",), ("overcoat", "parka"),
                  ("open-toed shoe",), ("blouse",), ("running shoe", "tennis shoe"), ("purse", "tote"),
                  ("bootie",))
PLURAL_NAMES = frozenset({"trousers", "pants", "jeans", "slacks"})

TRAIN_TEMPLATES = ("{a} {brightness} {name}", "a photo of {a} {fill} {pattern} {name}",
                   "{a} {fill}, {brightness} {name}", "{a} {pattern} {name}",
                   "a picture of {a} {brightness} {pattern} {name}", "{brightness} {fill} {pattern} {name}",
                   "{a} {name}, {fill} and {brightness}")
HELD_OUT_TEMPLATES = ("an image showing {a} {name}: {brightness}, {fill} and {pattern}",
                      "{a} {pattern} {name} in a {brightness} shade", "this is {a} {fill} {name}",
                      "a snapshot of {a} {brightness}, {pattern} {name}")

ARTICLE = "\x00"                    # stands for {a} until the word after it is known


# -- measuring ---------------------------------------------------------------------------------------------------
def unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 {0..255} or float [-1, 1] images (N, 1, H, W) as float [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise DifflabError(f"attributes are measured on (N, 1, H, W) grey images, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


def native_frame(images: torch.Tensor, resize: str = "pad") -> torch.Tensor:
    """Float images back in the 28x28 frame of the thresholds: the inverse of ``resize_images``'s ``pad``
    (a centre crop) or ``resize`` (antialiased bilinear)."""
    h, w = images.shape[-2:]
    if (h, w) == (NATIVE_SIZE, NATIVE_SIZE):
        return images
    if resize == "pad":
        if min(h, w) < NATIVE_SIZE:
            raise DifflabError(f"cannot crop {h}x{w} images to the {NATIVE_SIZE}x{NATIVE_SIZE} frame; use resize")
        top, left = (h - NATIVE_SIZE) // 2, (w - NATIVE_SIZE) // 2
        return images[..., top:top + NATIVE_SIZE, left:left + NATIVE_SIZE]
    if resize == "resize":
        return F.interpolate(images, size=(NATIVE_SIZE, NATIVE_SIZE), mode="bilinear", antialias=True,
                             align_corners=False)
    raise DifflabError(f"unknown resize mode {resize!r}; choose 'pad' or 'resize'")


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius)


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return -F.max_pool2d(-mask, 2 * radius + 1, stride=1, padding=radius)


def straight_from_border(passable: torch.Tensor) -> torch.Tensor:
    """Pixels of ``passable`` (float 0/1) joined to the frame's border by a straight run of passable pixels
    along their row or column (cumulative products from each of the four sides)."""
    reached = sum(passable.cumprod(dim) + passable.flip(dim).cumprod(dim).flip(dim) for dim in (-1, -2))
    return (reached > 0).float()


def silhouette(mask: torch.Tensor) -> torch.Tensor:
    """The garment's outline filled in: the mask closed by a 3x3 element, then everything that the
    background, flooded (8-connected) from the frame's border through pixels outside the closed mask,
    does not reach. The flood starts from the straight runs from the border and grows one pixel a step,
    on the images still growing only."""
    outside = 1 - erode(dilate(mask, 1), 1)
    background = straight_from_border(outside)
    growing = torch.arange(len(mask), device=mask.device)
    while len(growing):
        before = background[growing]
        grown = dilate(before, 1) * outside[growing]
        background[growing] = grown
        growing = growing[(grown != before).flatten(1).any(1)]
    return 1 - background


def interior(shape: torch.Tensor) -> torch.Tensor:
    """The silhouette eroded by two pixels, or by one for images where two leave nothing."""
    deep = erode(shape, 2)
    return torch.where(deep.sum((1, 2, 3), keepdim=True) > 0, deep, erode(shape, 1))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)


def measure_batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three attributes of float [0, 1] images (N, 1, 28, 28), each (N,)."""
    garment = (x > GARMENT_LEVEL / 255).float()
    shape = silhouette(garment)
    high_pass = (x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)).abs()
    return {"brightness": masked_mean(x, garment), "fill": shape.mean((1, 2, 3)),
            "pattern": masked_mean(high_pass, interior(shape))}


def measure_attributes(images: torch.Tensor, resize: str = "pad", chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Brightness, fill and pattern (float32 (N,) each) of uint8 or [-1, 1] images (N, 1, H, W), measured in
    the 28x28 frame (``resize``: how larger images were made from it, as in ``load_fashion_mnist``)."""
    parts = [measure_batch(native_frame(unit_range(images[i:i + chunk]), resize))
             for i in range(0, len(images), chunk)]
    return {name: torch.cat([part[name] for part in parts]) if parts else torch.zeros(0) for name in ATTRIBUTES}


def compute_attribute_thresholds(attributes: dict[str, torch.Tensor], labels: torch.Tensor,
                                 num_classes: int = len(CLASS_NAMES)) -> dict[str, tuple[tuple[float, ...], ...]]:
    """Per class, the ``ATTRIBUTE_QUANTILES`` of each attribute (rounded to 4 decimals): the cut points
    between its words."""
    thresholds = {}
    for name in ATTRIBUTES:
        q = torch.tensor(ATTRIBUTE_QUANTILES[name], dtype=torch.float64)
        thresholds[name] = tuple(tuple(round(v, 4) for v in torch.quantile(
            attributes[name][labels == c].double(), q).tolist()) for c in range(num_classes))
    return thresholds


def attribute_words(attributes: dict[str, torch.Tensor], labels: torch.Tensor,
                    thresholds: dict = ATTRIBUTE_THRESHOLDS) -> list[dict[str, str]]:
    """Each image's words ({"brightness": "dark", "fill": "large", "pattern": "plain"}), cut at its class's
    thresholds."""
    columns = {}
    for name in ATTRIBUTES:
        cuts = torch.tensor(thresholds[name], dtype=torch.float64)[labels]              # (N, words - 1)
        index = (attributes[name].double()[:, None] > cuts).sum(1)
        columns[name] = [ATTRIBUTE_WORDS[name][i] for i in index.tolist()]
    return [{name: columns[name][i] for name in ATTRIBUTES} for i in range(len(labels))]


# -- writing captions --------------------------------------------------------------------------------------------
def resolve_articles(text: str) -> str:
    """Each ``ARTICLE`` mark becomes "an" before a vowel and "a" otherwise."""
    text = re.sub(ARTICLE + r" (?=[aeiou])", "an ", text)
    return text.replace(ARTICLE, "a")


def fill_template(template: str, name: str, words: dict[str, str]) -> str:
    article = "a pair of" if name in PLURAL_NAMES else ARTICLE
    return resolve_articles(template.format(a=article, name=name, **words))


def caption_for(index: int, label: int, attributes: dict[str, str], split: str, held_out: bool = False) -> str:
    """The caption of image ``index`` of ``split`` with class ``label`` and attribute words ``attributes``:
    a template and a synonym drawn by a generator seeded with the split, the index and the vocabulary, so
    the same image always gets the same caption. ``held_out`` draws only from the held-out vocabulary."""
    names, templates = (HELD_OUT_NAMES, HELD_OUT_TEMPLATES) if held_out else (TRAIN_NAMES, TRAIN_TEMPLATES)
    rng = random.Random(f"fashion-mnist/{split}/{index}/{'held-out' if held_out else 'train'}")
    template = rng.choice(templates)
    return fill_template(template, rng.choice(names[label]), attributes)


# -- reading captions --------------------------------------------------------------------------------------------
def phrase_pattern(phrase: str) -> re.Pattern:
    """``phrase`` as a whole word: hyphens count as part of a word, so "shirt" is not found in "t-shirt"."""
    return re.compile(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])")


def class_vocabulary() -> list[tuple[str, int, bool]]:
    """Every name a caption may use, as (phrase, class, held out), longest first: the training and held-out
    synonyms and the parts of the class's own name ("t-shirt", "top", "trouser")."""
    entries = {(part.lower(), c, False) for c, name in enumerate(CLASS_NAMES) for part in name.split("/")}
    entries |= {(n, c, False) for c, names in enumerate(TRAIN_NAMES) for n in names}
    entries |= {(n, c, True) for c, names in enumerate(HELD_OUT_NAMES) for n in names}
    return sorted(entries, key=lambda e: (-len(e[0]), e[0]))


CLASS_VOCABULARY = [(phrase_pattern(phrase), phrase, label, held_out)
                    for phrase, label, held_out in class_vocabulary()]
WORD_PATTERNS = {attribute: [(phrase_pattern(word), word) for word in words]
                 for attribute, words in ATTRIBUTE_WORDS.items()}


def parse_caption(caption: str) -> dict:
    """What a caption states: ``label`` (class id, None when no class name is found), ``name`` (the phrase
    found), ``held_out`` (whether it is a held-out paraphrase) and each attribute's word (None where unsaid).
    Names are matched longest first, so "ankle boot" wins over "boot"; the first name in the caption counts."""
    text = caption.lower()
    found = {"label": None, "name": None, "held_out": None}
    first = len(text) + 1
    for pattern, phrase, label, held_out in CLASS_VOCABULARY:
        match = pattern.search(text)
        if match is None:
            continue
        if match.start() < first:
            first = match.start()
            found.update(label=label, name=phrase, held_out=held_out)
        text = text[:match.start()] + " " * len(phrase) + text[match.end():]     # no shorter name inside it
    for attribute, patterns in WORD_PATTERNS.items():
        stated = [(m.start(), word) for pattern, word in patterns for m in [pattern.search(text)] if m]
        found[attribute] = min(stated)[1] if stated else None
    return found


def caption_agreement(images: torch.Tensor, captions: list[str], resize: str = "pad") -> dict[str, float]:
    """The attribute check: per attribute, the fraction of the captions stating it whose word the image's
    measured attribute gets (cut at the class the caption names); nan where no caption states it."""
    parsed = [parse_caption(c) for c in captions]
    known = [i for i, p in enumerate(parsed) if p["label"] is not None]
    measured = measure_attributes(images[known], resize)
    words = attribute_words(measured, torch.tensor([parsed[i]["label"] for i in known], dtype=torch.long))
    agreement = {}
    for name in ATTRIBUTES:
        checks = [w[name] == parsed[i][name] for i, w in zip(known, words) if parsed[i][name] is not None]
        agreement[name] = sum(checks) / len(checks) if checks else float("nan")
    return agreement


# -- the data set ------------------------------------------------------------------------------------------------
@dataclass
class CaptionedImages:
    """Images with one caption each, the labels they came from and what was measured on them."""
    images: torch.Tensor                                    # uint8 (N, C, H, W)
    labels: torch.Tensor                                    # int64 (N,), indices into class_names
    captions: list[str]
    attributes: dict[str, torch.Tensor] = field(default_factory=dict)   # float32 (N,) each
    class_names: tuple[str, ...] = ()
    name: str = ""

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> CaptionedImages:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return CaptionedImages(self.images[indices], self.labels[indices],
                               [self.captions[i] for i in indices.tolist()],
                               {k: v[indices] for k, v in self.attributes.items()}, self.class_names, self.name)

    def as_captioned_data(self) -> CaptionedData:
        """The training loop's in-memory form (``difflab.data.base.CaptionedData``)."""
        return CaptionedData(self.images, self.labels, num_classes=len(self.class_names), name=self.name,
                             class_names=self.class_names, captions=tuple(self.captions))


def load_captioned_fashion_mnist(split: str = "train", path=None, image_size: int = 32, resize: str = "pad",
                                 held_out: bool = False) -> CaptionedImages:
    """Fashion-MNIST (``load_fashion_mnist``'s files) with captions; the attributes are measured at 28x28,
    before ``resize``. ``held_out``: captions in the held-out vocabulary (for the test split's paraphrases)."""
    native = load_fashion_mnist(split, path, image_size=NATIVE_SIZE)
    attributes = measure_attributes(native.data)
    words = attribute_words(attributes, native.labels)
    captions = [caption_for(i, label, w, split, held_out)
                for i, (label, w) in enumerate(zip(native.labels.tolist(), words))]
    return CaptionedImages(resize_images(native.data, image_size, resize), native.labels, captions, attributes,
                           CLASS_NAMES, name=f"captioned_fashion_mnist/{split}{'/held-out' if held_out else ''}")


def main() -> None:
    """Print ``ATTRIBUTE_THRESHOLDS`` recomputed from the training split."""
    train = load_fashion_mnist("train", image_size=NATIVE_SIZE)
    thresholds = compute_attribute_thresholds(measure_attributes(train.data), train.labels)
    print("ATTRIBUTE_THRESHOLDS = {")
    for name, cuts in thresholds.items():
        print(f"    {name!r}: {cuts},")
    print("}")


if __name__ == "__main__":
    main()
