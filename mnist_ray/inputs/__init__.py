"""Where rows come from, behind one entry (``registry.open_input``): named datasets, image folders,
archives, Parquet of any origin and image shards, each read into the project's row form.
"""
