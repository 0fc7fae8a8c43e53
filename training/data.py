"""Ratings logs -> filtered, labelled, chronological slates split per user.

Owns: reading MovieLens-100K (the copy inside the ``recbole==1.2.1`` wheel), MovieLens-1M from a local
folder and any ratings table (CSV/Parquet); the iterative k-core filter; labels z = rating >= 3; the
vocabularies of items and side features; 6-item slates and the per-user time split.
Does not know: retrievers, candidate lists, models or torch.

Index conventions shared with the model and the exported manifest:
- items: 0 = padding, 1 = out-of-vocabulary, 2.. = known items in ``Dataset.item_ids`` order;
- every side-feature field: 0 = padding / unknown value, 1.. = that field's vocabulary.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

PAD, OOV = 0, 1
ITEM_OFFSET = 2
MULTI_SEP = "|"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Ratings:
    """A raw ratings log with optional side features, all ids as strings."""

    name: str
    interactions: pd.DataFrame  # user_id: str, item_id: str, rating: float, timestamp: int64
    users: pd.DataFrame | None = None  # user_id + single-valued categorical columns
    items: pd.DataFrame | None = None  # item_id + categorical columns, "a|b" for multi-valued


# ---------------------------------------------------------------------------------------------- loaders


def read_table(path: Path, **kwargs: object) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be parsed ({exc})") from exc


def require_columns(df: pd.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(df.columns)} "
                        f"(map other names with --columns SOURCE=TARGET, e.g. userId=user_id)")


def parse_columns(spec: str) -> dict[str, str]:
    """``--columns userId=user_id,movieId=item_id`` as {source: target}; empty for an empty spec."""
    mapping: dict[str, str] = {}
    for pair in (p.strip() for p in spec.split(",") if p.strip()):
        source, sep, target = (x.strip() for x in pair.partition("="))
        if not sep or not source or not target:
            raise DataError(f"--columns: '{pair}' is not SOURCE=TARGET (e.g. userId=user_id)")
        if source in mapping:
            raise DataError(f"--columns: '{source}' is mapped twice")
        if target in mapping.values():
            raise DataError(f"--columns: two columns are mapped to '{target}'")
        mapping[source] = target
    return mapping


def rename_columns(df: pd.DataFrame, path: Path, columns: dict[str, str]) -> pd.DataFrame:
    """``df`` with ``columns``' sources renamed; a target that is already a column of the file is refused."""
    present = {s: t for s, t in columns.items() if s in df.columns}
    clash = [t for s, t in present.items() if t in df.columns and t not in present]
    if clash:
        raise DataError(f"{path}: --columns maps onto {clash}, which the file already has")
    return df.rename(columns=present)


def _clean_interactions(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    require_columns(df, path, ["user_id", "item_id", "rating", "timestamp"])
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype(str).str.strip(),
            "item_id": df["item_id"].astype(str).str.strip(),
            "rating": pd.to_numeric(df["rating"], errors="coerce"),
            "timestamp": pd.to_numeric(df["timestamp"], errors="coerce"),
        }
    )
    for column in ("rating", "timestamp"):
        bad = out[column].isna() | ~np.isfinite(out[column].to_numpy(dtype=float, na_value=np.nan))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(f"{path}: column '{column}' has a non-numeric value {df[column].iloc[row]!r} "
                            f"at data row {row + 1}")
    empty = (out["user_id"] == "") | (out["item_id"] == "")
    if empty.any():
        raise DataError(f"{path}: empty user_id or item_id at data row {int(np.flatnonzero(empty)[0]) + 1}")
    if out.empty:
        raise DataError(f"{path}: no interactions")
    out["timestamp"] = out["timestamp"].astype(np.int64)
    return out


def side_table(df: pd.DataFrame, path: Path, key: str) -> pd.DataFrame:
    require_columns(df, path, [key])
    df = df.astype(str)
    df[key] = df[key].str.strip()
    if df[key].duplicated().any():
        raise DataError(f"{path}: duplicate {key} {df[key][df[key].duplicated()].iloc[0]!r}")
    return df.reset_index(drop=True)


def ml100k_dir() -> Path:
    """The ML-100K folder inside the installed ``recbole`` wheel (never imported, only located)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataError("MovieLens-100K: package 'recbole' is not installed "
                        "(pip install --no-deps recbole==1.2.1)")
    return Path(spec.origin).parent / "dataset_example" / "ml-100k"


def _age_bucket(age: str) -> str:
    """MovieLens-1M's age groups, so both datasets share one profile vocabulary shape."""
    try:
        value = int(age)
    except ValueError:
        return ""
    for upper, label in ((18, "1"), (25, "18"), (35, "25"), (45, "35"), (50, "45"), (56, "50")):
        if value < upper:
            return label
    return "56"


def load_ml100k(folder: Path | None = None) -> Ratings:
    """MovieLens-100K in RecBole's atomic format (``ml-100k.{inter,user,item}``, tab-separated)."""
    folder = folder or ml100k_dir()

    def atomic(suffix: str) -> pd.DataFrame:
        path = folder / f"ml-100k.{suffix}"
        df = read_table(path, sep="\t", quoting=3)
        df.columns = [c.split(":")[0] for c in df.columns]
        return df

    inter = _clean_interactions(atomic("inter"), folder / "ml-100k.inter")
    users = side_table(atomic("user"), folder / "ml-100k.user", "user_id")
    require_columns(users, folder / "ml-100k.user", ["age", "gender", "occupation"])
    users = pd.DataFrame({"user_id": users["user_id"], "age": users["age"].map(_age_bucket),
                          "gender": users["gender"], "occupation": users["occupation"]})
    items = side_table(atomic("item"), folder / "ml-100k.item", "item_id")
    require_columns(items, folder / "ml-100k.item", ["release_year", "class"])
    decade = items["release_year"].str[:3].where(items["release_year"].str.len() == 4, "") + "0s"
    items = pd.DataFrame({"item_id": items["item_id"], "decade": decade.where(decade != "0s", ""),
                          "genre": items["class"].str.split().str.join(MULTI_SEP)})
    return Ratings("ml100k", inter, users, items)


def load_ml1m(folder: Path) -> Ratings:
    """MovieLens-1M from a local folder holding ``ratings.dat``, ``users.dat`` and ``movies.dat``."""

    def dat(name: str, columns: list[str]) -> pd.DataFrame:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        rows = [line.rstrip("\n").split("::") for line in path.read_text(encoding="latin-1").splitlines()]
        bad = next((i for i, r in enumerate(rows) if len(r) != len(columns)), None)
        if bad is not None:
            raise DataError(f"{path}: line {bad + 1} has {len(rows[bad])} fields, expected {len(columns)} "
                            f"({'::'.join(columns)})")
        return pd.DataFrame(rows, columns=columns)

    inter = _clean_interactions(dat("ratings.dat", ["user_id", "item_id", "rating", "timestamp"]),
                                folder / "ratings.dat")
    users = dat("users.dat", ["user_id", "gender", "age", "occupation", "zip"]).drop(columns="zip")
    movies = dat("movies.dat", ["item_id", "title", "genres"])
    year = movies["title"].str.extract(r"\((\d{4})\)\s*$")[0].fillna("")
    items = pd.DataFrame({"item_id": movies["item_id"], "decade": year.str[:3].where(year != "", "") + "0s",
                          "genre": movies["genres"]})
    items.loc[year == "", "decade"] = ""
    return Ratings("ml1m", inter, side_table(users, folder / "users.dat", "user_id"),
                   side_table(items, folder / "movies.dat", "item_id"))


def load_table(ratings: Path, users: Path | None = None, items: Path | None = None,
               columns: dict[str, str] | None = None) -> Ratings:
    """Any ratings table (CSV or Parquet) with user_id, item_id, rating, timestamp, after renaming ``columns``
    ({source: target}, e.g. MovieLens-20M's {"userId": "user_id", "movieId": "item_id"}) in every file.

    Optional side tables: ``users`` keyed by user_id, ``items`` keyed by item_id; every other column is a
    categorical feature, and item values holding ``|`` are multi-valued. A mapped column no file has is an error.
    """
    files = read_renamed([ratings, users, items], columns or {})
    inter = _clean_interactions(files[ratings], ratings)
    user_df = side_table(files[users], users, "user_id") if users else None
    item_df = side_table(files[items], items, "item_id") if items else None
    return Ratings(ratings.stem, inter, user_df, item_df)


def read_renamed(paths: list[Path | None], columns: dict[str, str]) -> dict[Path, pd.DataFrame]:
    """Each given file read, with ``columns`` ({source: target}) renamed in every one; a mapped column that no
    file has is an error."""
    files = {path: read_table(path) for path in paths if path}
    unused = [s for s in columns if not any(s in df.columns for df in files.values())]
    if unused:
        raise DataError(f"--columns names {unused}, a column of none of {[str(p) for p in files]}")
    return {path: rename_columns(df, path, columns) for path, df in files.items()}


def load(name: str, path: Path | None = None, users: Path | None = None,
         items: Path | None = None, columns: dict[str, str] | None = None) -> Ratings:
    """Dispatch by dataset name: ``ml100k``, ``ml1m`` (folder) or ``table`` (ratings file, ``columns`` renamed)."""
    if name == "ml100k":
        return load_ml100k(path)
    if name == "ml1m":
        if path is None:
            raise DataError("ml1m: pass the folder holding ratings.dat, users.dat, movies.dat")
        return load_ml1m(path)
    if name == "table":
        if path is None:
            raise DataError("table: pass the ratings CSV or Parquet file")
        return load_table(path, users, items, columns)
    raise DataError(f"unknown dataset {name!r}; expected ml100k, ml1m or table")


# ---------------------------------------------------------------------------------------------- prepare


def core_filter(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than ``k`` interactions until none is left."""
    while True:
        user_counts = inter["user_id"].map(inter["user_id"].value_counts())
        item_counts = inter["item_id"].map(inter["item_id"].value_counts())
        keep = (user_counts >= k) & (item_counts >= k)
        if keep.all():
            return inter.reset_index(drop=True)
        inter = inter[keep]


@dataclass(frozen=True)
class Field:
    """One categorical side feature: value vocabulary (index = position + 1) and per-entity tokens."""

    name: str
    vocab: list[str]
    tokens: np.ndarray  # (n_entities, max_tokens) int64, 0 = padding / unknown


@dataclass(frozen=True)
class Slates:
    """The slates of one split: slate s is ``seq[user[s]][start[s] : start[s] + slate_size]``."""

    user: np.ndarray  # (N,) int64 user index
    start: np.ndarray  # (N,) int64 offset in that user's chronological sequence

    def __len__(self) -> int:
        return len(self.user)


@dataclass
class Dataset:
    """A filtered ratings log in index space, ready for the retriever and the reranker."""

    name: str
    user_ids: list[str]
    item_ids: list[str]  # item index i >= ITEM_OFFSET is item_ids[i - ITEM_OFFSET]
    seq_items: list[np.ndarray]  # per user, item indices sorted by time
    seq_z: list[np.ndarray]  # per user, labels z = rating >= threshold
    user_fields: list[Field]  # single-valued profile fields, tokens shape (n_users, 1)
    item_fields: list[Field]  # tokens shape (n_items + ITEM_OFFSET, T); rows 0 and 1 are padding
    splits: dict[str, Slates]
    slate_size: int
    history_len: int
    n_interactions: int
    stats: dict[str, int | float] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        """Rows of the item embedding table, padding and OOV included."""
        return len(self.item_ids) + ITEM_OFFSET

    def item_id(self, index: int | np.integer) -> str:
        """The raw id of a known item index (>= ITEM_OFFSET)."""
        return self.item_ids[int(index) - ITEM_OFFSET]

    def profile(self) -> np.ndarray:
        """(n_users, F) profile token matrix, one column per user field (F may be 0)."""
        if not self.user_fields:
            return np.zeros((len(self.user_ids), 0), dtype=np.int64)
        return np.concatenate([f.tokens for f in self.user_fields], axis=1)


def _encode_field(name: str, values: list[str], multi: bool) -> Field:
    token_lists = [[t for t in (v.split(MULTI_SEP) if multi else [v]) if t] for v in values]
    vocab = sorted({t for tokens in token_lists for t in tokens})
    index = {t: i + 1 for i, t in enumerate(vocab)}
    width = max(1, max((len(t) for t in token_lists), default=1))
    tokens = np.zeros((len(values), width), dtype=np.int64)
    for row, toks in enumerate(token_lists):
        tokens[row, : len(toks)] = [index[t] for t in toks]
    return Field(name, vocab, tokens)


def encode_sides(users: pd.DataFrame | None, items: pd.DataFrame | None, user_ids: list[str], item_ids: list[str]
                 ) -> tuple[list[Field], list[Field]]:
    """The side tables' fields over exactly ``user_ids`` and ``item_ids`` (rows they lack: no value); item token
    rows start with ITEM_OFFSET padding rows so that row = item index."""
    user_fields: list[Field] = []
    if users is not None:
        side = users.set_index("user_id").reindex(user_ids).fillna("")
        user_fields = [_encode_field(c, side[c].tolist(), multi=False) for c in side.columns]
    item_fields: list[Field] = []
    if items is not None:
        side = items.set_index("item_id").reindex(item_ids).fillna("")
        for c in side.columns:
            f = _encode_field(c, side[c].tolist(), multi=side[c].str.contains(MULTI_SEP, regex=False).any())
            pad = np.zeros((ITEM_OFFSET, f.tokens.shape[1]), dtype=np.int64)
            item_fields.append(Field(f.name, f.vocab, np.concatenate([pad, f.tokens])))
    return user_fields, item_fields


def natural_key(raw: str) -> tuple[int, int | str]:
    return (0, int(raw)) if raw.isdigit() else (1, raw)


def prepare(ratings: Ratings, core: int = 20, slate_size: int = 6, history_len: int = 30,
            positive_threshold: float = 3.0) -> Dataset:
    """Filter, label, encode and split ``ratings``.

    Each user's interactions are sorted by (timestamp, item id) and cut into consecutive slates of
    ``slate_size`` counted from the end, so the newest interactions form the last slate and the
    ``len % slate_size`` oldest ones serve only as history. The last slate is test, the one before it
    validation, the rest train. Users with fewer than three slates are dropped.
    """
    inter = core_filter(ratings.interactions, core)
    if inter.empty:
        raise DataError(f"{ratings.name}: nothing survives the {core}-core filter")
    item_ids = sorted(inter["item_id"].unique(), key=natural_key)
    item_index = {raw: i + ITEM_OFFSET for i, raw in enumerate(item_ids)}
    inter = inter.assign(item_idx=inter["item_id"].map(item_index),
                         z=(inter["rating"] >= positive_threshold).astype(np.int8))
    inter = inter.sort_values(["user_id", "timestamp", "item_idx"], kind="stable")

    user_ids: list[str] = []
    seq_items: list[np.ndarray] = []
    seq_z: list[np.ndarray] = []
    split_rows: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in ("train", "valid", "test")}
    for raw_user, group in inter.groupby("user_id", sort=False):
        items = group["item_idx"].to_numpy(dtype=np.int64)
        n_slates = len(items) // slate_size
        if n_slates < 3:
            continue
        u = len(user_ids)
        user_ids.append(str(raw_user))
        seq_items.append(items)
        seq_z.append(group["z"].to_numpy(dtype=np.int8))
        first = len(items) - n_slates * slate_size
        starts = [first + s * slate_size for s in range(n_slates)]
        for split, these in (("train", starts[:-2]), ("valid", starts[-2:-1]), ("test", starts[-1:])):
            split_rows[split][0].extend([u] * len(these))
            split_rows[split][1].extend(these)
    splits = {s: Slates(np.asarray(us, dtype=np.int64), np.asarray(st, dtype=np.int64))
              for s, (us, st) in split_rows.items()}

    user_fields, item_fields = encode_sides(ratings.users, ratings.items, user_ids, item_ids)
    n_inter = sum(len(s) for s in seq_items)
    dataset = Dataset(ratings.name, user_ids, item_ids, seq_items, seq_z, user_fields, item_fields, splits,
                      slate_size, history_len, n_inter)
    positives = sum(int(z.sum()) for z in seq_z)
    dataset.stats = {"users": len(user_ids), "items": len(item_ids), "interactions": n_inter,
                     "positive_rate": positives / max(n_inter, 1),
                     **{f"slates_{s}": len(v) for s, v in splits.items()}}
    return dataset


def history(dataset: Dataset, slates: Slates) -> np.ndarray:
    """(N, history_len) item indices before each slate, most recent last, left-padded with PAD."""
    out = np.zeros((len(slates), dataset.history_len), dtype=np.int64)
    for row, (u, start) in enumerate(zip(slates.user, slates.start, strict=True)):
        past = dataset.seq_items[u][max(0, start - dataset.history_len) : start]
        if len(past):
            out[row, -len(past) :] = past
    return out


def stats_table(dataset: Dataset) -> str:
    """A Markdown table in the shape of the paper's dataset statistics (Tables 5-6)."""
    s = dataset.stats
    if dataset.slate_size == 0:  # a candidate log: rows are candidates, lists are requests
        rows = [("users", s["users"]), ("items", s["items"]), ("candidate rows", s["interactions"]),
                ("label rate (label = 1)", f"{s['positive_rate']:.3f}"),
                ("requests train", s["slates_train"]), ("requests valid", s["slates_valid"]),
                ("requests test", s["slates_test"]), ("history length", dataset.history_len)]
        return "\n".join(["| statistic | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    rows = [("users", s["users"]), ("items", s["items"]), ("interactions", s["interactions"]),
            ("positive rate (z = 1)", f"{s['positive_rate']:.3f}"),
            ("slates train", s["slates_train"]), ("slates valid", s["slates_valid"]),
            ("slates test", s["slates_test"]),
            ("slate size", dataset.slate_size),
            ("history length", dataset.history_len)]
    return "\n".join(["| statistic | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
