"""Pipelines of qdiablo verbs: `qdiablo run` (quantize -> train -> eval -> export, resumable) and
`qdiablo compare` (the methods x bits x budgets grid, with statistics and a figure)."""
