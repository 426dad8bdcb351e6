"""Developer scripts, and the helpers the tests and the benchmarks share (never ``tests/``): the fixture web,
corpus builders over ../shared/data, the tiny models and tokenizer, a scripted engine, local networking."""
