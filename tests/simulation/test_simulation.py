"""The seeded fault simulator as tests: a fixed set of seeds in CI, any number on demand.

    CATGA_SIM_SEEDS=500 pytest tests/simulation          # a longer run (seeds 0..499)
    CATGA_SIM_STEPS=2000 CATGA_SIM_FIRST_SEED=1000 ...     # longer runs, other seeds

A failing seed's message ends with the command that replays it (add ``--trace`` to see every event,
``--log info`` for the library's logs, ``--keep-going`` for every violation of the run).
"""

from __future__ import annotations

import logging
import os

import pytest

from tests.simulation.run import Options, simulate

SEEDS = int(os.environ.get("CATGA_SIM_SEEDS", "100"))
FIRST_SEED = int(os.environ.get("CATGA_SIM_FIRST_SEED", "0"))
STEPS = int(os.environ.get("CATGA_SIM_STEPS", "300"))


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + SEEDS))
def test_every_invariant_holds(seed: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="fastapi_catga")  # the replay command shows them
    report = simulate(Options(seed, STEPS))
    if not report.ok:
        pytest.fail(report.summary(), pytrace=False)


def test_a_seed_replays_exactly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="fastapi_catga")
    first, second = simulate(Options(5, 200, keep_going=True)), simulate(Options(5, 200, keep_going=True))
    assert len(first.trace) > 1000  # a run that did something
    assert first.trace == second.trace
    assert first.digest == second.digest


def test_the_replay_command_names_the_seed_and_the_steps() -> None:
    assert Options(123, 2000).replay().endswith("-m tests.simulation --seed 123 --steps 2000")
