"""The counting core's state machine (tests/test_payment_machine.py) explored at length:
`make faults`."""

from __future__ import annotations

import pytest

from shared.settings import Settings
from tests.test_payment_machine import run_machine


@pytest.mark.faults_long
@pytest.mark.timeout(3600)
def test_the_counting_core_keeps_its_invariants_over_many_runs(settings: Settings) -> None:
    run_machine(settings, max_examples=2000, steps=30)
