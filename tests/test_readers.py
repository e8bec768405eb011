"""Each raw format reads into the same (user_id, item_id, rating) frame."""

import gzip

import polars as pl

import pytest

from macrid.errors import DataError
from macrid.data.readers import read_raw


def test_netflix_training_set(tmp_path):
    folder = tmp_path / "training_set"
    folder.mkdir()
    (folder / "mv_0000001.txt").write_text("1:\n6,3,2005-09-06\n7,5,2005-05-13\n")
    (folder / "mv_0000002.txt").write_text("2:\n6,4,2005-09-06\n")
    (tmp_path / "movie_titles.txt").write_text("1,2003,Dinosaur Planet\n2,2004,Isle of Man TT, 2004 Review\n")
    raw = read_raw(tmp_path)
    assert raw.format == "netflix"
    assert sorted(raw.interactions.rows()) == [(6, 1, 3.0), (6, 2, 4.0), (7, 1, 5.0)]
    assert raw.items.filter(pl.col("item_id") == 2)["title"][0] == "Isle of Man TT, 2004 Review"


def test_ml20m_csv(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n")
    (tmp_path / "movies.csv").write_text('movieId,title,genres\n2,Jumanji (1995),Adventure|Children\n29,"City, The",Drama\n')
    raw = read_raw(tmp_path)
    assert raw.format == "ml-20m" and raw.interactions.rows() == [(1, 2, 3.5), (1, 29, 4.0)]
    assert raw.items.filter(pl.col("item_id") == 2)["genres"][0].to_list() == ["Adventure", "Children"]


def test_ml1m_with_and_without_timestamps(tmp_path):
    with gzip.open(tmp_path / "ratings.dat.gz", "wt") as f:
        f.write("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "ratings.dat").write_text("1::1193::5\n2::661::4\n")
    assert read_raw(tmp_path / "ratings.dat.gz").interactions.rows() == [(1, 1193, 5.0), (1, 661, 3.0)]
    assert read_raw(tmp_path / "plain").interactions.rows() == [(1, 1193, 5.0), (2, 661, 4.0)]


def test_generic_table_with_string_ids_and_no_rating(tmp_path):
    pl.DataFrame({"who": ["a", "b"], "what": ["x", "y"]}).write_parquet(tmp_path / "e.parquet")
    raw = read_raw(tmp_path / "e.parquet", user_col="who", item_col="what")
    assert raw.interactions["user_id"].to_list() == ["a", "b"]
    assert raw.interactions["rating"].null_count() == 2  # implicit: every interaction is kept


def test_adjacency_lists_merge_train_and_test(tmp_path):
    with gzip.open(tmp_path / "train.txt.gz", "wt") as f:
        f.write("0 10 11 12\n1 10\n")
    (tmp_path / "test.txt").write_text("0 13\n1 11 12\n")
    raw = read_raw(tmp_path)
    assert raw.format == "adjacency"
    assert sorted(raw.interactions.select("user_id", "item_id").rows()) == [
        (0, 10), (0, 11), (0, 12), (0, 13), (1, 10), (1, 11), (1, 12)]


def test_union_of_sources_keeps_their_ids_apart(tmp_path):
    """jobs/prepare.py --input a --input b: ids become "<folder>:<id>"; same-named folders are refused."""
    import subprocess
    import sys

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.txt").write_text("".join(f"{u} " + " ".join(str(i) for i in range(u, u + 6)) + "\n"
                                                         for u in range(8)))
    from macrid.data.batches import snapshot_uri
    from macrid.data.prepare import prepare
    from macrid.data.raw_input import Source
    from macrid.data.split import Protocol

    lake = str(tmp_path / "lake")
    meta = prepare([Source(str(tmp_path / "a"), prefix="a:"), Source(str(tmp_path / "b"), prefix="b:")], lake, "u",
                   Protocol(heldout=2, min_rating=None))
    users = pl.read_parquet(f"{snapshot_uri(lake, 'u')}/users/part-0.parquet")
    assert meta["n_users"] == 16 and set(users["user_id"]) == {f"{s}:{u}" for s in "ab" for u in range(8)}
    done = subprocess.run([sys.executable, "jobs/prepare.py", "--local", "--input", str(tmp_path / "a"), "--input",
                           str(tmp_path / "a") + "/", "--lake", lake, "--name", "v"], capture_output=True, text=True)
    assert done.returncode == 2 and "distinct folder names" in done.stderr


def test_item_tables_with_int_titles_or_string_genres_read_as_text_and_lists(tmp_path):
    """An int title is shown as its text; "A|B" genres are two genres, not three characters; a struct is refused."""
    import polars as pl

    from macrid.data.readers import read_items

    pl.DataFrame({"item_id": [1, 2], "title": [10, 20], "genres": ["Action|Comedy", "Drama"]}).write_parquet(
        tmp_path / "a.parquet")
    items = read_items(tmp_path / "a.parquet")
    assert items["title"].to_list() == ["10", "20"]
    assert items["genres"].to_list() == [["Action", "Comedy"], ["Drama"]]
    pl.DataFrame({"item_id": [1], "genres": [[3, 4]]}).write_parquet(tmp_path / "b.parquet")
    assert read_items(tmp_path / "b.parquet")["genres"].to_list() == [["3", "4"]]
    pl.DataFrame({"item_id": [1], "genres": [{"x": 1}]}).write_parquet(tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: column 'genres' is Struct"):
        read_items(tmp_path / "c.parquet")
