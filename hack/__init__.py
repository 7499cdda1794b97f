"""Developer and demo tooling built on the test harness (python -m hack.cluster, python -m hack.demo)."""
