"""Benchmarks: each `pipeline bench-…` command runs our code and a baseline on the same data in the same run.

Also the data generators the benchmarks and the tests share (`datasets`).
"""
