"""Valid ranges of numeric config fields, and the one line that names a value outside its range.

Shared by the data config (`data.config.RANGES`) and the training config (`train.config_check`).
"""
import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high` (None: unbounded), each bound included unless `open_low` /
    `open_high`, and the values of `special` (e.g. -1 meaning "all" or "automatic")."""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    special: tuple = ()

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.special:
            return True
        if math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            span = f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.open_low else '>='} {self.low:g}"
        else:
            span = f"{'<' if self.open_high else '<='} {self.high:g}"
        return " or ".join([*(f"{value:g}" for value in self.special), span])


AT_LEAST_ONE = Range(1)
POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
BELOW_ONE = Range(0, 1, open_high=True)


def field_value(config, dotted: str):
    """config's field at a dotted path, or KeyError when the config has none there."""
    value = config
    for part in dotted.split("."):
        if part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def out_of_range(config, ranges: dict, prefix: str) -> list[str]:
    """One line per field of `ranges` whose value in `config` lies outside its range, named
    `prefix` + its path; fields the config does not have are skipped."""
    problems = []
    for name, valid in ranges.items():
        try:
            value = field_value(config, name)
        except KeyError:
            continue
        if not valid.holds(value):
            problems.append(f"{prefix}{name}={value!r} is out of range; valid: {valid}")
    return problems
