"""Loaders on the real ML-100K and on generated files, the k-core filter, slates and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training import data


def test_ml100k_loads_from_the_recbole_wheel(ml100k: data.Ratings) -> None:
    inter = ml100k.interactions
    assert len(inter) == 100_000
    assert inter["user_id"].nunique() == 943 and inter["item_id"].nunique() == 1682
    assert inter["rating"].between(1, 5).all()
    assert ml100k.users is not None and set(ml100k.users.columns) == {"user_id", "age", "gender", "occupation"}
    assert ml100k.items is not None and "Animation|Children's|Comedy" in set(ml100k.items["genre"])


def test_ml100k_prepare_statistics(ml100k: data.Ratings) -> None:
    dataset = data.prepare(ml100k)
    s = dataset.stats
    assert s["slates_valid"] == s["slates_test"] == s["users"]
    assert s["slates_train"] > 10 * s["users"]
    assert 0.5 < s["positive_rate"] < 1.0
    table = data.stats_table(dataset)
    assert f"| users | {s['users']} |" in table


def test_core_filter_is_iterative() -> None:
    # Item "c" has 1 rating, from user "y"; dropping it leaves y with 1 rating, so y goes in round 2.
    inter = pd.DataFrame({"user_id": ["x", "x", "y", "y", "z", "z"],
                          "item_id": ["a", "b", "a", "c", "a", "b"],
                          "rating": 4.0, "timestamp": range(6)})
    out = data.core_filter(inter, 2)
    assert set(out["user_id"]) == {"x", "z"} and set(out["item_id"]) == {"a", "b"}
    assert (out.groupby("user_id").size() >= 2).all() and (out.groupby("item_id").size() >= 2).all()


def test_slates_are_chronological_and_split_last_two(synthetic_files: tuple[Path, Path, Path]) -> None:
    ratings = data.load_table(*synthetic_files)
    dataset = data.prepare(ratings, core=10, history_len=8)
    raw = ratings.interactions.sort_values(["user_id", "timestamp"])
    for u, user_id in enumerate(dataset.user_ids[:10]):
        seq = dataset.seq_items[u]
        n_slates = len(seq) // 6
        first = len(seq) - 6 * n_slates
        user_rows = dataset.splits["train"].user == u
        starts = sorted(dataset.splits["train"].start[user_rows].tolist())
        assert starts == [first + 6 * s for s in range(n_slates - 2)]
        assert dataset.splits["valid"].start[dataset.splits["valid"].user == u][0] == len(seq) - 12
        assert dataset.splits["test"].start[dataset.splits["test"].user == u][0] == len(seq) - 6
        # Labels: z = rating >= 3, in time order.
        kept = raw[(raw["user_id"] == user_id) & raw["item_id"].isin(dataset.item_ids)]
        assert list(dataset.seq_z[u]) == list((kept["rating"] >= 3).astype(int))
        assert [dataset.item_id(i) for i in seq] == kept["item_id"].tolist()


def test_history_holds_only_the_past(synthetic_files: tuple[Path, Path, Path]) -> None:
    dataset = data.prepare(data.load_table(*synthetic_files), core=10, history_len=8)
    test = dataset.splits["test"]
    hist = data.history(dataset, test)
    for row in range(5):
        u, start = test.user[row], test.start[row]
        assert list(hist[row]) == list(dataset.seq_items[u][start - 8 : start])
    first_train = dataset.splits["train"]
    rows = np.flatnonzero(first_train.start < 8)[:3]
    early = data.history(dataset, data.Slates(first_train.user[rows], first_train.start[rows]))
    for r, row in enumerate(rows):
        n = first_train.start[row]
        assert (early[r, : 8 - n] == data.PAD).all()


def test_side_features_encode_multi_values(synthetic_files: tuple[Path, Path, Path]) -> None:
    dataset = data.prepare(data.load_table(*synthetic_files), core=10)
    genre = next(f for f in dataset.item_fields if f.name == "genre")
    assert genre.vocab == ["a", "b", "c"] and genre.tokens.shape[1] == 2
    assert (genre.tokens[: data.ITEM_OFFSET] == 0).all()
    assert dataset.profile().shape == (len(dataset.user_ids), 1)


def test_parquet_table(tmp_path: Path, synthetic_files: tuple[Path, Path, Path]) -> None:
    pd.read_csv(synthetic_files[0]).to_parquet(tmp_path / "r.parquet")
    ratings = data.load_table(tmp_path / "r.parquet")
    assert len(ratings.interactions) == len(pd.read_csv(synthetic_files[0]))
    assert ratings.users is None and ratings.items is None


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_columns_map_other_names_in_every_file(tmp_path: Path, synthetic_files: tuple[Path, Path, Path],
                                                fmt: str) -> None:
    """MovieLens-20M's names (userId, movieId) read through --columns give what the renamed files give."""
    mapping = data.parse_columns("userId=user_id, movieId=item_id")
    back = {t: s for s, t in mapping.items()}
    paths = []
    for i, source in enumerate(synthetic_files):
        df = pd.read_csv(source, dtype=str).rename(columns=back)
        path = tmp_path / f"t{i}.{fmt}"
        df.to_parquet(path) if fmt == "parquet" else df.to_csv(path, index=False)
        paths.append(path)
    got = data.load_table(*paths, columns=mapping)
    want = data.load_table(*synthetic_files)
    pd.testing.assert_frame_equal(got.interactions, want.interactions)
    assert got.users is not None and want.users is not None and list(got.users.columns) == list(want.users.columns)
    assert got.items is not None and want.items is not None and list(got.items.columns) == list(want.items.columns)
    with pytest.raises(data.DataError, match=r"t0\.\w+: missing column\(s\) \['user_id', 'item_id'\]; found "
                                             r"\['userId', 'movieId'.*--columns SOURCE=TARGET"):
        data.load_table(paths[0])  # without the mapping: names the file, the columns and the fix


@pytest.mark.parametrize(
    ("spec", "message"),
    [("userId", "'userId' is not SOURCE=TARGET"), ("userId=", "'userId=' is not SOURCE=TARGET"),
     ("a=user_id,b=user_id", "two columns are mapped to 'user_id'"), ("a=x,a=y", "'a' is mapped twice")],
)
def test_malformed_columns_are_refused(spec: str, message: str) -> None:
    with pytest.raises(data.DataError, match=message):
        data.parse_columns(spec)


def test_a_mapped_column_no_file_has_or_a_clash_is_named(tmp_path: Path,
                                                         synthetic_files: tuple[Path, Path, Path]) -> None:
    with pytest.raises(data.DataError, match=r"--columns names \['usr'\], a column of none of .*ratings\.csv"):
        data.load_table(synthetic_files[0], columns={"usr": "user_id"})
    with pytest.raises(data.DataError, match=r"ratings\.csv: --columns maps onto \['user_id'\], which the file"):
        data.load_table(synthetic_files[0], columns={"item_id": "user_id"})


def test_ml1m_folder(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::2::978300761\n", encoding="latin-1")
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n", encoding="latin-1")
    (tmp_path / "movies.dat").write_text("10::Toy Story (1995)::Animation|Comedy\n11::Héat (1995)::Action\n",
                                         encoding="latin-1")
    ratings = data.load_ml1m(tmp_path)
    assert ratings.interactions["rating"].tolist() == [5.0, 2.0]
    assert ratings.items is not None and ratings.items["decade"].tolist() == ["1990s", "1990s"]
    assert ratings.items["genre"].tolist() == ["Animation|Comedy", "Action"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_id,item_id,rating\n1,2,3\n", "missing column(s) ['timestamp']"),
        ("user_id,item_id,rating,timestamp\n1,2,five,100\n", "column 'rating' has a non-numeric value 'five'"),
        ("user_id,item_id,rating,timestamp\n1,2,4,later\n", "column 'timestamp' has a non-numeric value 'later'"),
        ("user_id,item_id,rating,timestamp\n1,,4,100\n", "empty user_id or item_id at data row 1"),
        ("user_id,item_id,rating,timestamp\n", "no interactions"),
    ],
)
def test_malformed_table_names_file_and_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(data.DataError) as err:
        data.load_table(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match=r"ratings\.csv: file not found"):
        data.load_table(tmp_path / "ratings.csv")
    with pytest.raises(data.DataError, match=r"ratings\.dat: file not found"):
        data.load_ml1m(tmp_path)
    with pytest.raises(data.DataError, match=r"ml-100k\.inter: file not found"):
        data.load_ml100k(tmp_path)


def test_ml1m_bad_line_is_named(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::2\n")
    with pytest.raises(data.DataError, match=r"ratings\.dat: line 2 has 3 fields, expected 4"):
        data.load_ml1m(tmp_path)


def test_duplicate_side_key_is_refused(tmp_path: Path, synthetic_files: tuple[Path, Path, Path]) -> None:
    (tmp_path / "users.csv").write_text("user_id,group\nu1,a\nu1,b\n")
    with pytest.raises(data.DataError, match=r"users\.csv: duplicate user_id 'u1'"):
        data.load_table(synthetic_files[0], users=tmp_path / "users.csv")


def test_nothing_survives_the_filter(synthetic_files: tuple[Path, Path, Path]) -> None:
    with pytest.raises(data.DataError, match="nothing survives the 500-core filter"):
        data.prepare(data.load_table(synthetic_files[0]), core=500)
