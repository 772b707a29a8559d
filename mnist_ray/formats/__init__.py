"""What the stages write and read back: image shards, predictions, and the Ray Data sink that
writes shards. Shared by every stage; imports only `images` and `plumbing`.
"""
