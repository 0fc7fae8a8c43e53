"""A seeded synthetic ratings log with MovieLens-100K's shape at any size: the scale table's input.

Owns: ``generate`` (users, items, interactions -> a ratings DataFrame with user_id, item_id, rating, timestamp, plus
user and item side tables) and ``ML100K``, the size it scales from.
Does not know: the pipeline that reads it (``training/data.py``'s table path).

Structure that a model can learn, drawn in O(interactions) time and memory: users and items sit in ``clusters``
taste groups; an item's draw weight for a user is its Zipf popularity times ``affinity`` when it shares the user's
group; ratings are higher inside the group. Each user's interaction count is 20 (the k-core) plus a geometric tail
with the asked mean; (user, item) pairs are drawn with replacement, repeats dropped, and what a user still lacks
drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

ML100K = (943, 1682, 100_000)  # users, items, interactions
MIN_PER_USER = 20  # the pipeline's default k-core


@dataclass(frozen=True)
class Size:
    users: int
    items: int
    interactions: int

    @classmethod
    def times(cls, factor: float, max_users: int = 100_000, max_items: int = 20_000) -> Size:
        """``factor`` x ML-100K's interactions; users grow with it (to ``max_users``), items with its square root
        (to ``max_items``), as catalogues grow slower than audiences."""
        users, items, inter = ML100K
        return cls(min(round(users * factor), max_users), min(round(items * factor**0.5), max_items),
                   round(inter * factor))


def generate(size: Size, seed: int = 0, clusters: int = 20, affinity: float = 8.0, zipf: float = 0.9
             ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, items) of ``size`` (module docstring), the same for the same ``seed``."""
    rng = np.random.default_rng(seed)
    u_group = rng.integers(clusters, size=size.users)
    i_group = rng.integers(clusters, size=size.items)
    popularity = 1.0 / np.arange(1, size.items + 1) ** zipf
    popularity = popularity[rng.permutation(size.items)]
    mean_tail = max(size.interactions / size.users - MIN_PER_USER, 1.0)
    per_user = MIN_PER_USER + rng.geometric(1.0 / mean_tail, size=size.users) - 1
    per_user = np.round(per_user * size.interactions / per_user.sum()).astype(np.int64).clip(MIN_PER_USER)
    cdfs = []
    for g in range(clusters):
        weights = popularity * np.where(i_group == g, affinity, 1.0)
        cdfs.append(np.cumsum(weights) / weights.sum())
    pairs = pd.DataFrame({"u": np.zeros(0, np.int64), "i": np.zeros(0, np.int64)})
    short = per_user.copy()
    for _ in range(10):  # draw what each user still lacks (and a margin), drop repeats, keep at most its count
        users = np.repeat(np.arange(size.users), np.ceil(short * 1.3).astype(np.int64) + (short > 0))
        items = np.empty(len(users), dtype=np.int64)
        for g in range(clusters):  # one CDF per taste group, searched for every draw of its users at once
            at = u_group[users] == g
            items[at] = np.minimum(np.searchsorted(cdfs[g], rng.random(int(at.sum()))), size.items - 1)
        pairs = pd.concat([pairs, pd.DataFrame({"u": users, "i": items})]).drop_duplicates()
        pairs = pairs[pairs.groupby("u").cumcount().to_numpy() < per_user[pairs["u"].to_numpy()]]
        short = per_user - np.bincount(pairs["u"].to_numpy(), minlength=size.users)
        if not short.any():
            break
    pairs = pairs.sort_values("u", kind="stable")
    u, i = pairs["u"].to_numpy(), pairs["i"].to_numpy()
    same = u_group[u] == i_group[i]
    rating = np.clip(np.round(2.6 + 1.4 * same + rng.normal(0.0, 1.0, len(u))), 1, 5).astype(np.int64)
    timestamp = 874_724_710 + rng.integers(0, 20_000_000, len(u))
    ratings = pd.DataFrame({"user_id": u + 1, "item_id": i + 1, "rating": rating, "timestamp": timestamp})
    users_df = pd.DataFrame({"user_id": np.arange(1, size.users + 1),
                             "group": [f"g{g % 5}" for g in u_group],  # a coarse, partly informative side feature
                             "age": [f"a{a}" for a in rng.integers(7, size=size.users)]})
    items_df = pd.DataFrame({"item_id": np.arange(1, size.items + 1),
                             "genre": [f"genre{g}|genre{(g + 1) % clusters}" for g in i_group]})
    return ratings, users_df, items_df
