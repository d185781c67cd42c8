"""The hub's state machine (tests/test_hub_machine.py) explored at length: `make faults`."""

from __future__ import annotations

import pytest

from tests.test_hub_machine import run_machine


@pytest.mark.faults_long
@pytest.mark.timeout(1800)
def test_hub_state_machine_keeps_its_invariants_over_many_runs() -> None:
    run_machine(max_examples=4000, steps=40)
