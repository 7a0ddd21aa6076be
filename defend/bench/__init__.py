"""IDLS-Bench: the leaderboard of model cards (``defend bench``).

:mod:`defend.bench.leaderboard` reads and validates cards (JSON only, size-capped, schema, protocol hash, hashes of
the weights and inputs) and ranks their entries; :mod:`defend.bench.pareto` finds the Pareto front;
:mod:`defend.bench.writers` writes ``leaderboard.md`` / ``leaderboard.csv``; :mod:`defend.bench.page` the
self-contained ``index.html`` with its inline SVG scatter; :mod:`defend.bench.cli` is the command. See docs/bench.md.
"""
