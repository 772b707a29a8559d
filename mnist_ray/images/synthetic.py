"""Printed digits rendered from fonts that ship with the dependencies, for training.

The fonts are split in two, and the split is fixed here: training renders TRAIN_FONTS
(matplotlib's DejaVu Sans, Serif and Sans Mono in four styles each and STIX General in four,
the twelve Roboto faces of Ray's dashboard, six weights upright and italic, and font wheels
of Google Fonts (SIL OFL) and Caladea (Apache 2.0) chosen by kind of print: book serifs
(Source Serif Pro, Caladea, PT Serif, Crimson Text), a calligraphic italic (EB Garamond), a
slab serif with old-style figures (Zilla Slab), a typewriter-like monospace (IBM Plex Mono) and
a high-contrast display bold (Abril Fatface), most of them upright and italic), the robustness
measurement MEASURE_FONTS (matplotlib's Computer Modern: roman, bold, sans, typewriter,
italic), so the measured accuracy is on faces the model has never seen.
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mnist_ray.images import preprocess

TRAIN_FONTS = tuple(
    [f"DejaVu{family}{style}.ttf" for family in ("Sans", "SansMono")
     for style in ("", "-Bold", "-Oblique", "-BoldOblique")]
    + [f"DejaVuSerif{style}.ttf" for style in ("", "-Bold", "-Italic", "-BoldItalic")]
    + [f"STIXGeneral{style}.ttf" for style in ("", "Bol", "Italic", "BolIta")]
    # Another sans design, in more weights than DejaVu has: digits of a printed form or label.
    + [f"ray:roboto-latin-{weight}{style}" for weight in (100, 300, 400, 500, 700, 900) for style in ("", "italic")]
    # Book serifs, upright and italic in several weights: the digits of printed pages.
    + [f"font_source_serif_pro:SourceSerifPro-{face}.ttf"
       for weight in ("ExtraLight", "Light", "", "Semibold", "Bold", "Black")
       for face in (weight or "Regular", weight + "It")]
    + [f"font_caladea:Caladea-{style}.ttf" for style in ("Regular", "Bold", "Italic", "BoldItalic")]
    + [f"fontpkg_pt_serif:PT_Serif-Web-{style}.ttf" for style in ("Regular", "Bold", "Italic", "BoldItalic")]
    + [f"fontpkg_crimson_text:CrimsonText-{face}.ttf"
       for face in ("Regular", "Italic", "SemiBold", "SemiBoldItalic", "Bold", "BoldItalic")]
    # Book italics written with a pen rather than slanted: open 4s, curled 2s and 7s.
    + ["fontpkg_eb_garamond:EBGaramond[wght].ttf", "fontpkg_eb_garamond:EBGaramond-Italic[wght].ttf"]
    # Slabs and monospace: forms, receipts, typewritten pages; Zilla's figures are old-style.
    + [f"fontpkg_zilla_slab:ZillaSlab-{face}.ttf" for face in ("Light", "Regular", "Bold", "Italic", "BoldItalic")]
    + [f"fontpkg_ibm_plex_mono:IBMPlexMono-{face}.ttf"
       for face in ("Light", "Regular", "Bold", "LightItalic", "Italic", "BoldItalic")]
    # Thick stems and hairlines in one digit: headlines, posters.
    + ["fontpkg_abril_fatface:AbrilFatface-Regular.ttf"])
MEASURE_FONTS = ("cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf")
RAY_FONTS = ("dashboard", "client", "build", "static", "media")  # where the ray wheel keeps its web fonts


def font_path(name: str) -> str:
    """The file of a font of TRAIN_FONTS or MEASURE_FONTS: matplotlib's, or ``ray:NAME`` (a WOFF
    of Ray's dashboard, whose file name carries a content hash)."""
    if name.startswith("ray:"):
        import ray

        pattern = os.path.join(os.path.dirname(ray.__file__), *RAY_FONTS, name[4:] + ".*.woff")
        found = sorted(glob.glob(pattern))
        if not found:
            raise FileNotFoundError(f"font {name}: no {pattern} in this Ray install")
        return found[0]
    if name.startswith(("font_", "fontpkg_")):  # a font wheel: PACKAGE:FILE in the package's files/
        import importlib.util

        package, _, file = name.partition(":")
        spec = importlib.util.find_spec(package)
        if spec is None:
            raise FileNotFoundError(f"font {name}: the {package} package is not installed")
        return os.path.join(spec.submodule_search_locations[0], "files", file)
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)


@functools.lru_cache(maxsize=512)
def _font(font_file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_file, size)


def render(digit: int, font_file: str, rng: np.random.Generator) -> np.ndarray:
    """One printed digit as a grey picture: random size, weight, slant, position, polarity,
    paper and ink shades, blur and noise (uint8, about 1.5x the glyph)."""
    size = int(rng.integers(18, 72))
    font = _font(font_file, size)
    side = int(size * rng.uniform(1.3, 1.8))
    paper, ink = int(rng.uniform(170, 256)), int(rng.uniform(0, 90))
    canvas = Image.new("L", (side, side), paper)
    centre = (side / 2 + rng.uniform(-0.1, 0.1) * side, side / 2 + rng.uniform(-0.1, 0.1) * side)
    stroke = int(rng.integers(0, max(1, size // 20) + 1))  # a bolder print of the same face
    ImageDraw.Draw(canvas).text(centre, str(digit), fill=ink, font=font, anchor="mm",
                                stroke_width=stroke, stroke_fill=ink)
    canvas = canvas.rotate(rng.uniform(-7, 7), resample=Image.Resampling.BILINEAR, fillcolor=paper)
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5) * size / 40))
    picture = np.asarray(canvas, np.float32) + rng.normal(0, rng.uniform(0, 5), (side, side))
    picture = np.clip(picture, 0, 255).astype(np.uint8)
    return 255 - picture if rng.random() < 0.5 else picture


def font_schedule(per_class: int, fonts: int) -> np.ndarray:
    """The font of every rendering, (per_class, 10): round ``i`` draws digit ``d`` in font
    ``i + d``, so every font draws every digit once ``per_class >= fonts``. (Counting renderings
    instead, font ``10 * i + d``, gives a font only even or only odd digits whenever the number
    of fonts is even.)"""
    return (np.arange(per_class)[:, None] + np.arange(10)[None, :]) % fonts


def printed_digits(fonts: tuple[str, ...], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` printed digits of every class over ``fonts`` (``font_schedule``), as the
    model sees them (``preprocess.mnist_like``): uint8 (10 * per_class, 28, 28) and int labels."""
    rng = np.random.default_rng(seed)
    files = [font_path(f) for f in fonts]
    images, labels = [], []
    for row in font_schedule(per_class, len(files)):
        for digit, font in enumerate(row):
            images.append(preprocess.mnist_like(render(digit, files[font], rng)))
            labels.append(digit)
    return np.stack(images), np.array(labels, np.int32)
