"""What every stage runs on: connecting to Ray, GPUs, logs, storage and the publish protocol,
the output lock, and the workarounds for Ray's and TensorFlow's edges.
"""
