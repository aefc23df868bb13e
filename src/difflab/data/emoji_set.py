"""Colour emoji as small RGB images captioned with their Unicode names (issue #18, text-to-image).

Glyphs come from Debian's ``fonts-noto-color-emoji`` (``FONT_PATH``), a CBDT bitmap font with one strike of
136x128-pixel colour glyphs: Pillow opens it at size 109 only and draws the bitmaps with ``embedded_color``
(libraqm, which Pillow uses when present, shapes ZWJ sequences, flags and keycaps into their single glyphs).
Each glyph is drawn centred on a transparent square, composited onto WHITE (the emoji are designed for light
backgrounds: black ones such as "black circle" stay visible, and Noto's white ones carry a grey outline;
blending at full resolution before resizing leaves no dark fringe), and reduced with Lanczos.

Which emoji: every fully-qualified one in the ``emoji`` package (PyPI ``emoji``, its ``EMOJI_DATA``) that the
font draws as one glyph. One the font lacks comes out blank (a newer code point: its .notdef is empty) or as
several glyphs side by side (a newer ZWJ sequence falls apart into its parts); both are skipped.

Names are the package's English names (Unicode's CLDR short names, as in emoji-test.txt) without colons and
underscores (":waving_hand_medium_skin_tone:" -> "waving hand medium skin tone"); country and region flags,
which it names by the country alone, get "flag of".
The split is by emoji, with an emoji's skin-tone variants kept together: the test split holds the emoji whose
name less its "... skin tone" parts has a SHA-256 that is 0 mod 10 (about 10%). Labels index ``class_names``,
every rendered emoji's name in both splits, so a test label never occurs in training. Each emoji's caption
is one of ``CAPTION_TEMPLATES``, drawn by a generator seeded with its name.

Rendering all of them takes seconds to a minute; the arrays are cached in ``CACHE_DIR`` as ``.npz``, keyed
by the font file's size and modification time, the emoji package's version, the image size and ``limit``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from difflab.data.captions import CaptionedImages
from difflab.errors import DifflabError
from difflab.files import atomic_write

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_SIZE = 109                         # the font's one bitmap strike (136x128-pixel glyphs)
REFERENCE_EMOJI = "\U0001F600"          # grinning face: one glyph's width
BACKGROUND = (255, 255, 255, 255)
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab" / "emoji"
RENDER_VERSION = 1                      # part of the cache key: raise it when the rendering changes
TEST_MODULUS = 10                       # the test split: base-name hashes that are 0 mod this
CAPTION_TEMPLATES = ("{name}", "{name} emoji", "the {name} emoji", "an emoji of {name}", "an emoji: {name}")
SKIN_TONE = re.compile(r" (?:medium-light|medium-dark|light|medium|dark) skin tone")
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_CHARACTERS = range(0xE0020, 0xE0080)


def import_emoji():
    try:
        import emoji
    except ImportError:
        raise DifflabError("the emoji data set needs the emoji package (pip install 'emoji>=2.0')") from None
    return emoji


# -- which emoji, named and split ----------------------------------------------------------------------------------
def is_flag_of_a_place(text: str) -> bool:
    """Country flags (two regional indicators) and region flags (black flag and tag characters)."""
    return ord(text[0]) in REGIONAL_INDICATORS or (len(text) > 1 and ord(text[1]) in TAG_CHARACTERS)


def emoji_name(text: str, english: str) -> str:
    """The package's English name as words: ":red_heart:" -> "red heart", ":France:" -> "flag of France"."""
    name = english.strip(":").replace("_", " ")
    return f"flag of {name}" if is_flag_of_a_place(text) else name


def base_name(name: str) -> str:
    """The name less its skin tones: "handshake light skin tone dark skin tone" -> "handshake"."""
    return SKIN_TONE.sub("", name)


def emoji_split(name: str) -> str:
    """'test' for about one emoji in ``TEST_MODULUS`` (a SHA-256 of the base name), 'train' for the rest."""
    digest = int.from_bytes(hashlib.sha256(base_name(name).encode()).digest()[:8], "big")
    return "test" if digest % TEST_MODULUS == 0 else "train"


def candidate_emoji(limit: int | None = None) -> list[tuple[str, str]]:
    """(emoji, name) for every fully-qualified emoji, in code-point order; ``limit`` keeps that many spread
    evenly over the list (a quick subset for tests)."""
    emoji = import_emoji()
    qualified = emoji.STATUS["fully_qualified"]
    candidates = sorted((text, emoji_name(text, data["en"])) for text, data in emoji.EMOJI_DATA.items()
                        if data["status"] == qualified)
    if limit is not None and limit < len(candidates):
        candidates = candidates[::len(candidates) // limit][:limit]
    return candidates


# -- rendering -----------------------------------------------------------------------------------------------------
def open_font(path: Path = FONT_PATH):
    from PIL import ImageFont
    if not Path(path).is_file():
        raise DifflabError(f"emoji font {path} not found (apt-get install {FONT_PACKAGE})")
    try:
        return ImageFont.truetype(str(path), size=FONT_SIZE)
    except OSError as e:
        raise DifflabError(f"emoji font {path}: cannot open it at size {FONT_SIZE} ({e}; "
                           f"Debian's {FONT_PACKAGE} is the CBDT font expected)") from None


def render_emoji(font, text: str, size: int, glyph_width: int) -> np.ndarray | None:
    """One emoji as uint8 (3, size, size) on ``BACKGROUND``, or None when the font lacks it (blank, or
    wider than one glyph)."""
    from PIL import Image, ImageDraw
    left, top, right, bottom = font.getbbox(text)
    if bottom <= top or right - left > glyph_width:
        return None
    side = max(right - left, bottom - top)
    glyph = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text(((side - (right - left)) // 2 - left, (side - (bottom - top)) // 2 - top), text,
                               font=font, embedded_color=True)
    if glyph.getchannel("A").getbbox() is None:
        return None
    image = Image.alpha_composite(Image.new("RGBA", glyph.size, BACKGROUND), glyph).convert("RGB")
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def render_all(font_path: Path, size: int, limit: int | None) -> dict[str, np.ndarray]:
    """Every candidate the font has: ``images`` uint8 (N, 3, size, size), ``emoji`` and ``names`` (N,)."""
    font = open_font(font_path)
    glyph_width = font.getbbox(REFERENCE_EMOJI)[2] - font.getbbox(REFERENCE_EMOJI)[0]
    images, kept = [], []
    for text, name in candidate_emoji(limit):
        image = render_emoji(font, text, size, glyph_width)
        if image is not None:
            images.append(image)
            kept.append((text, name))
    if not images:
        raise DifflabError(f"emoji font {font_path} drew none of the emoji (is it Debian's {FONT_PACKAGE}?)")
    return {"images": np.stack(images), "emoji": np.array([t for t, _ in kept]),
            "names": np.array([n for _, n in kept])}


# -- the cache -----------------------------------------------------------------------------------------------------
def cache_path(cache_dir: Path, font_path: Path, size: int, limit: int | None) -> Path:
    stat = Path(font_path).stat()
    key = f"{stat.st_size}-{stat.st_mtime_ns}-{import_emoji().__version__}-{size}-{limit}-v{RENDER_VERSION}"
    return Path(cache_dir) / f"emoji-{size}px-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            return {key: cached[key] for key in ("images", "emoji", "names")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically; a cache that cannot be written is a warning, not a failure."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:                         # a file object: np.savez would append .npz to a name
            np.savez_compressed(f, **arrays)
    try:
        atomic_write(path, write)
    except DifflabError as e:
        warnings.warn(f"emoji cache not written: {e}", stacklevel=3)


def rendered_emoji(font_path: Path, size: int, limit: int | None, cache_dir: Path | None) -> dict[str, np.ndarray]:
    if not Path(font_path).is_file():
        open_font(font_path)                               # the one-line error naming the font and package
    path = cache_path(cache_dir, font_path, size, limit) if cache_dir is not None else None
    arrays = read_cache(path) if path is not None and path.is_file() else None
    if arrays is None:
        arrays = render_all(Path(font_path), size, limit)
        if path is not None:
            write_cache(path, arrays)
    return arrays


# -- the data set --------------------------------------------------------------------------------------------------
def emoji_caption(name: str) -> str:
    """The emoji's one caption: a template drawn by a generator seeded with its name."""
    return random.Random(f"emoji/{name}").choice(CAPTION_TEMPLATES).format(name=name)


def load_emoji_set(split: str = "train", size: int = 32, limit: int | None = None, font_path=FONT_PATH,
                   cache_dir: Path | None = CACHE_DIR) -> CaptionedImages:
    """The emoji of ``split`` ('train', 'test' or 'all') as RGB uint8 (N, 3, size, size) with their captions;
    ``limit``: only that many candidates, spread over the list (before skipping those the font lacks);
    ``cache_dir=None`` renders without a cache."""
    if split not in ("train", "test", "all"):
        raise DifflabError(f"unknown emoji split {split!r}; choose 'train', 'test' or 'all'")
    arrays = rendered_emoji(Path(font_path), size, limit, cache_dir)
    names = [str(n) for n in arrays["names"]]
    chosen = [i for i, n in enumerate(names) if split == "all" or emoji_split(n) == split]
    return CaptionedImages(torch.from_numpy(arrays["images"][chosen].copy()), torch.tensor(chosen, dtype=torch.long),
                           [emoji_caption(names[i]) for i in chosen], {}, tuple(names), name=f"emoji/{split}")
