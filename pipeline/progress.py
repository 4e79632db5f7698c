"""Progress lines on the console, from a Ray worker or the driver (no Ray here)."""

from __future__ import annotations

import sys
import time

# (history key, format) of the figures a progress line shows when present.
FIGURES = (("loss", "loss {:.4f}"), ("sqdist", "sqdist {:.4f}"),
           ("reconstruction", "reconstruction {:.4f}"), ("clustering", "clustering {:.4f}"),
           ("changed", "changed {:.4f}"), ("nmi", "NMI {:.3f}"), ("acc", "ACC {:.3f}"),
           ("images_per_s", "{:,.0f} images/s"))


def say(line: str) -> None:
    """Write ``line`` to the process's real stdout, which Ray forwards to the driver's
    console as it happens (Ray Train routes ``print`` through its logger, which would double
    the lines)."""
    out = sys.__stdout__
    if out is not None:
        out.write(line + "\n")
        out.flush()


def figures(row: dict[str, float]) -> str:
    return "".join("  " + fmt.format(row[key]) for key, fmt in FIGURES if key in row)


class Progress:
    """Rank 0's progress lines: one per epoch, plus one every ``every_s`` within long
    epochs. ``label`` names the stage (``"epoch"`` for a method with a single one)."""

    def __init__(self, epochs: int, enabled: bool, every_s: float = 30.0,
                 label: str = "epoch", first: int = 0):
        self.epochs, self.enabled, self.every_s, self.label = epochs, enabled, every_s, label
        self.first = first  # shown epoch numbers start after this many (a stage in a run)
        self.t0 = self.last = time.perf_counter()

    def start_epoch(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def step(self, epoch: int, steps: int) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            say(f"{self.label} {self.first + epoch + 1}/{self.epochs}  step {steps}  {now - self.t0:.0f} s")

    def end_epoch(self, epoch: int, parts: dict[str, float]) -> None:
        if self.enabled:
            say(f"{self.label} {self.first + epoch + 1}/{self.epochs}{figures(parts)}  "
                f"({time.perf_counter() - self.t0:.1f} s)")
