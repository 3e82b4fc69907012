"""Benchmarks: optimizer step time against the memory-bandwidth bound, training throughput."""
