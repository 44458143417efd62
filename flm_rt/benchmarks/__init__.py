"""Benchmarks for flm_rt: the benchmark suite, an in-repository re-implementation of the upstream sampler
(``reference``), an autoregressive baseline, and the report writer. Run them with ``flm-rt bench``.

Nothing here is imported by ``import flm_rt``; matplotlib, transformers, gguf and tqdm are only needed by the
parts that use them.
"""
