import numpy as np
import pytest

from mnist_ray.model import models
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

cluster.configure_process_env()  # tf-keras before TensorFlow is first imported

# Parameter counts the seed articles print (000: MLP, 001: CNN, 003: tutorial CNN).
SEED_PARAMS = {"mlp": 101_770, "cnn": 110_986, "tutorial-cnn": 4_738_826}


@pytest.mark.parametrize("name", ["mlp", "cnn", "tutorial-cnn", "default"])
def test_every_model_maps_images_to_probabilities(name):
    model = models.create_model(name, seed=0)
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    y = model(x, training=False).numpy()
    assert y.shape == (3, 10)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
    if name in SEED_PARAMS:
        assert model.count_params() == SEED_PARAMS[name]
    assert not any("random" in layer.name or "augment" in layer.name for layer in model.layers)


def test_same_seed_same_weights():
    a = models.create_model("cnn", seed=3).get_weights()
    b = models.create_model("cnn", seed=3).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_the_registry_lists_every_model_with_its_size():
    rows = {r["name"]: r for r in models.list_models()}
    assert set(rows) == {"mlp", "cnn", "tutorial-cnn", "default"}
    assert rows["cnn"]["params"] == SEED_PARAMS["cnn"]
    assert all(r["description"] for r in rows.values())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(MnistRayError, match="known models are cnn, default, mlp, tutorial-cnn"):
        models.get_spec("resnet")


@pytest.mark.parametrize("name", ["mlp", "cnn", "default"])
def test_width_scales_the_model_and_one_is_the_registered_model(name):
    base = models.create_model(name, seed=0)
    assert models.create_model(name, seed=0, width=1.0).count_params() == base.count_params()
    assert models.create_model(name, seed=0, width=0.5).count_params() < base.count_params()
    assert models.create_model(name, seed=0, width=1.5).count_params() > base.count_params()
    with pytest.raises(MnistRayError, match="width"):
        models.create_model(name, width=0)
