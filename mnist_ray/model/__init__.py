"""The model, shared by every stage that builds, writes or loads one: the registry of
architectures, the model dir's writer and reader, and the batched runtimes over it.
"""
