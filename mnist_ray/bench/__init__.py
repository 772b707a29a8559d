"""Benchmarks: how fast each job is against the naive code and the hardware, with figures
and ratios measured in one run.
"""
