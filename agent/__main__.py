"""`python -m agent` is the same as the `spegla` console script."""

from agent.cli.main import main

raise SystemExit(main())
