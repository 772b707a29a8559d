"""mnist-ray: prepare digit image shards, train, and score them in batches on Ray.

Importing the package starts nothing and imports neither Ray nor TensorFlow: each stage
imports what it needs when it runs.
"""

__version__ = "0.1.0"
