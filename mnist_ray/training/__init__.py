"""The training stage: image shards -> a Ray Train data-parallel TensorFlow job -> a model dir;
the hyperparameter search over it, and compression of a trained model.
"""
