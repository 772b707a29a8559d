"""The inference stage: image shards or files -> a Ray Data pool of predictor actors -> a
predictions dataset; and `predict`, the same model on a handful of files without Ray.
"""
