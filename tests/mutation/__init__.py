"""Mutation testing of the payment core (`make mutate`; see README.md and tests/mutation/*.toml).

`mutants.py` makes the mutants (AST operator swaps on the Python source, token mutants and
hand-made ones on the Lua scripts it embeds); `runner.py` runs each module's tests against each
mutant in a forked child that imports the mutated source from memory, so the checkout is never
written to and nothing has to be restored after a crash.
"""
