"""The `collab` section, apart from the collab stage so that the params stage checks it without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pipeline.params import Check, Fraction, PositiveInt


@dataclass(frozen=True)
class CollabConfig:
    n_factors: PositiveInt = 50
    y_range: Annotated[tuple[float, float], Check(lambda r: r[0] < r[1],
                                                  "use [low, high] with low < high, e.g. [0.0, 5.5]")] = (0.0, 5.5)
    epochs: PositiveInt = 5
    lr: float = 5e-3
    wd: float = 0.1
    bs: PositiveInt = 64
    valid_pct: Fraction = 0.2
    seed: int = 42
    threads: int | None = None  # torch CPU threads; null leaves torch's default
    report_min_ratings: int = 20  # movies rated less often are left out of the reports (their factors are noise)
