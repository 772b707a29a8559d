"""The online stage: a model dir behind HTTP on Ray Serve, its page, and the load test that
measures it.
"""
