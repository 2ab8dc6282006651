"""stagewise command line: `pipeline build-shards`, `verify-shards`, `stats`, benchmarks, `schedule` and `train`."""
