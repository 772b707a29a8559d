"""Where rows come from: named datasets, image folders, archives, Parquet of any origin and
image shards, each read into the project's row form (id, encoded image, label). Shared by
prepare and infer; imports only `formats`, `images` and `plumbing`.
"""
