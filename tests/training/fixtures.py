"""The training side's fixtures: a small synthetic ratings log with learnable structure, and a tiny trained
pipeline. Imported by conftest.py only when the training extra (torch, pandas) is installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import candidates, data, retriever
from training.train import TrainConfig, TrainResult, train


def synthetic_tables(n_users: int = 60, n_items: int = 80, per_user: int = 42, seed: int = 0
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Ratings driven by 2-d latent taste, so a model can learn something; ids are non-contiguous strings."""
    rng = np.random.default_rng(seed)
    u_lat, i_lat = rng.normal(size=(n_users, 2)), rng.normal(size=(n_items, 2))
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        affinity = i_lat[items] @ u_lat[u] + rng.normal(scale=0.5, size=per_user)
        ratings = np.clip(np.round(3 + affinity), 1, 5)
        times = 1_000_000 + u * 10 + np.sort(rng.choice(10_000, size=per_user, replace=False)) * 100
        rows += [(f"u{u}", str(1000 + i), float(r), int(t)) for i, r, t in zip(items, ratings, times, strict=True)]
    ratings_df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(n_users)],
                          "group": [f"g{int(u_lat[u, 0] > 0)}" for u in range(n_users)]})
    items = pd.DataFrame({"item_id": [str(1000 + i) for i in range(n_items)],
                          "genre": ["a|b" if i_lat[i, 1] > 0 else "c" for i in range(n_items)]})
    return ratings_df, users, items


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    ratings, users, items = synthetic_tables()
    ratings.to_csv(folder / "ratings.csv", index=False)
    users.to_csv(folder / "users.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return folder / "ratings.csv", folder / "users.csv", folder / "items.csv"


@dataclass
class Tiny:
    dataset: data.Dataset
    retr: retriever.RetrieverScores
    lists: dict[str, candidates.CandidateLists]
    cfg: TrainConfig
    result: TrainResult


TINY_LISTS = candidates.ListConfig(candidates=30, sampler="uniform")
TINY_TRAIN = TrainConfig(variant="prm-concat", epochs=3, patience=3, batch_size=64, hidden=32, heads=2,
                         layers=1, dropout=0.1, lr=3e-3)


@pytest.fixture(scope="session")
def tiny(synthetic_files: tuple[Path, Path, Path]) -> Tiny:
    """A tiny end-to-end run: synthetic table -> 10-core -> MFs (pre-validation + 3 folds) -> 30-candidate lists
    (uniform negatives) -> PRM+concat."""
    dataset = data.prepare(data.load_table(*synthetic_files), core=10, history_len=8)
    retr = retriever.fit_retrievers(dataset, retriever.RetrieverConfig(dim=8, epochs=5, folds=3))
    lists = candidates.build_all_lists(dataset, retr, TINY_LISTS)
    result = train(dataset, lists, TINY_TRAIN, progress=False)
    return Tiny(dataset, retr, lists, TINY_TRAIN, result)


@pytest.fixture(scope="session")
def ml100k() -> data.Ratings:
    return data.load_ml100k()
