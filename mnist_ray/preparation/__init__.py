"""The prepare stage: any input -> Parquet image shards, encoded in parallel by Ray Data.
"""
