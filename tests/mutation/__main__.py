"""`python -m tests.mutation` (what `make mutate` runs)."""

from tests.mutation.runner import main

raise SystemExit(main())
