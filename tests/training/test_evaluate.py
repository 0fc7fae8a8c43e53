"""Which runs a pipeline asks for and what it ships: the shipping rule on hand-made runs."""

from __future__ import annotations

from training import evaluate
from training.runner import Run


def runs_of(valid: dict[str, list[float]]) -> list[Run]:
    return [Run(variant, seed, {"N@6": 0.0}, {"N@6": value}) for variant, values in valid.items()
            for seed, value in enumerate(values)]


def test_a_dnr_variant_ships_only_when_it_is_ahead_beyond_the_seeds_noise() -> None:
    # Ahead on the mean, inside the noise: the best baseline ships, and the reason says why.
    noisy = runs_of({"prm": [44.5, 44.2, 44.8, 44.4, 44.6], "prm-late": [44.7, 44.6, 44.9, 44.5, 44.7],
                     "dnr-g": [44.6, 45.1, 44.5, 44.9, 44.8]})
    assert evaluate.best_variant(noisy) == "dnr-g"
    shipped, why = evaluate.shipped_variant(noisy)
    assert shipped == "prm-late" and "dnr-g" in why and "no evidence" in why
    # Ahead on every seed by a clear margin: DNR ships.
    clear = runs_of({"prm": [44.5, 44.2, 44.8, 44.4, 44.6], "dnr-g": [45.6, 45.4, 45.9, 45.5, 45.8]})
    shipped, why = evaluate.shipped_variant(clear)
    assert shipped == "dnr-g" and "ahead of prm" in why
    # A baseline that is best on validation ships as it is.
    assert evaluate.shipped_variant(runs_of({"prm": [45.0, 45.1], "dnr-b": [44.0, 44.2]}))[0] == "prm"
