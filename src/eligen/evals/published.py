"""Published numbers printed beside ours, each with where it comes from (docs/design.md section 13). They are never
mixed into our own: a report prints them as their own rows, with the source, under the run's."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    label: str  # the row's name in the table
    source: str  # where the figure is printed
    numbers: dict[str, float]


CONTEXTGEN_PAPER = "ContextGen (ICLR 2026), its comparison table"
CONTEXTGEN_RETEST = "ContextGen's repository, bench/sample_scripts/README.md: its re-test of its released model"

COCOMIG = (
    Published("EliGen, published", CONTEXTGEN_PAPER, {"sr": 26.00, "isr": 64.12, "miou": 59.23}),
    Published("ContextGen, released model", CONTEXTGEN_RETEST, {"sr": 28.00, "isr": 64.91, "miou": 60.25}),
)
LAYOUTSAM = (
    Published("EliGen, published (1k subset)", CONTEXTGEN_PAPER,
              {"spatial": 94.05, "colour": 83.84, "texture": 87.31, "shape": 87.01}),
    Published("ContextGen, released model (its subset)", CONTEXTGEN_RETEST,
              {"spatial": 94.13, "colour": 86.41, "texture": 88.11, "shape": 87.57}),
)
OVERLAYBENCH = (
    Published("EliGen, public leaderboard", "OverLayBench's public leaderboard, as quoted by eligen's issue 28 "
              "(split and seeds not stated there)", {"miou": 68.17, "omiou": 43.72}),
    Published("best on that leaderboard", "the same", {"miou": 76.08, "omiou": 56.42}),
)


def sources(published: tuple[Published, ...]) -> list[str]:
    """One line per published row: ``label: source``."""
    return [f"{p.label}: {p.source}" for p in published]
