import os

import numpy as np

from mnist_ray.images import synthetic


def test_train_and_measure_fonts_ship_with_the_dependencies_and_do_not_overlap():
    from PIL import ImageFont

    assert not set(synthetic.TRAIN_FONTS) & set(synthetic.MEASURE_FONTS)
    for name in synthetic.TRAIN_FONTS + synthetic.MEASURE_FONTS:
        assert os.path.isfile(synthetic.font_path(name)), name
    # Ray's dashboard fonts are part of the default model's recipe: this fails when a Ray
    # release stops shipping them (the recipe would change with it).
    faces = {ImageFont.truetype(synthetic.font_path(n), 20).getname() for n in synthetic.TRAIN_FONTS
             if n.startswith("ray:")}
    assert len(faces) == 12 and {family for family, _ in faces} >= {"Roboto Thin", "Roboto Black"}
    # The font wheels bring the other kinds of print, italics among them: every name is a face
    # of its own (a wheel that renamed a file would give a fallback face twice).
    wheels = {ImageFont.truetype(synthetic.font_path(n), 20).getname() for n in synthetic.TRAIN_FONTS
              if n.startswith(("font_", "fontpkg_"))}
    families = {family for family, _ in wheels}
    assert len(wheels) == 40 and sum("Italic" in style for _, style in wheels) == 19, wheels
    assert {"PT Serif", "Crimson Text", "EB Garamond", "Zilla Slab", "IBM Plex Mono", "Abril Fatface"} <= families


def test_every_training_font_draws_every_digit():
    for fonts in (2, 7, 44, len(synthetic.TRAIN_FONTS)):
        schedule = synthetic.font_schedule(200, fonts)
        assert schedule.shape == (200, 10)
        for font in range(fonts):
            assert set(np.nonzero(schedule == font)[1]) == set(range(10)), (fonts, font)


def test_printed_digits_are_mnist_like_and_legible():
    images, labels = synthetic.printed_digits(synthetic.TRAIN_FONTS, per_class=3, seed=0)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == list(range(10)) * 3
    assert (images.max(axis=(1, 2)) > 200).all()
    assert (np.median(images.reshape(30, -1), axis=1) == 0).all()  # white digit on black
    # A digit's renderings in different fonts look more alike than two different digits do.
    flat = images.reshape(30, -1).astype(float)
    corr = np.corrcoef(flat)
    same = np.mean([corr[i, i + 10] for i in range(20)])
    other = np.mean([corr[i, j] for i in range(10) for j in range(10) if i != j])
    assert same > other + 0.2
    again, _ = synthetic.printed_digits(synthetic.TRAIN_FONTS, per_class=3, seed=0)
    np.testing.assert_array_equal(images, again)
