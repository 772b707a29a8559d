import numpy as np
import pytest

from mnist_ray.images import augment, preprocess


@pytest.mark.parametrize("kind", augment.KINDS)
def test_every_degradation_is_a_picture_of_the_same_digit(mnist_test_arrays, kind):
    images, _ = mnist_test_arrays
    make = {"low-resolution": augment.low_resolution, "thick": augment.thick,
            "blurred": augment.blurred, "photo": augment.photo}[kind]
    rng = np.random.default_rng(0)
    corr = []
    for digit in images[:20]:
        picture = make(digit, rng)
        assert picture.dtype == np.uint8 and picture.ndim == 2
        out = preprocess.mnist_like(picture)  # never blank
        corr.append(np.corrcoef(out.ravel().astype(float), digit.ravel().astype(float))[0, 1])
    assert np.median(corr) > 0.5, kind  # changed, but still that digit


def test_degrade_batch_is_seeded_by_id_and_keeps_mnist_shape(mnist_test_arrays):
    images, _ = mnist_test_arrays
    ids = [f"r{i}" for i in range(12)]
    a = augment.degrade_batch(images[:12], ids, seed=0)
    assert a.shape == (12, 28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a[5:], augment.degrade_batch(images[5:12], ids[5:], seed=0))  # by id
    assert not np.array_equal(a, augment.degrade_batch(images[:12], ids, seed=1))
    assert not np.array_equal(a, images[:12])


def test_pick_variants_takes_about_the_rate():
    import tensorflow as tf

    images, variants = tf.zeros([4000, 28, 28, 1]), tf.ones([4000, 28, 28, 1])
    picked = augment.pick_variants(images, variants, tf.constant([3, 4]), 0.3).numpy()
    share = picked[:, 0, 0, 0].mean()
    assert 0.25 < share < 0.35 and set(np.unique(picked)) == {0.0, 1.0}
    np.testing.assert_array_equal(picked, augment.pick_variants(images, variants, tf.constant([3, 4]), 0.3).numpy())
