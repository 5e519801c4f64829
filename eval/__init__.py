"""Math10K evaluation (GSM8K, SVAMP, MAWPS, AQuA), generation, reports and perplexity.

Import it by name (`from eval.math10k import ...`): `eval` is also a Python builtin.
"""
