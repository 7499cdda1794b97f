"""Developer and demo tooling built on the test harness.

`python -m hack.cluster` and `python -m hack.demo`.
"""
