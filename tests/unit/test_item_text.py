"""Item catalogue files and the text projection (no sentence model needed here)."""

import json
from pathlib import Path

import numpy as np
import pytest

from model.errors import DataError
from model.item_text import Projection, fit_projection, load_item_texts


def test_json_lines_csv_and_recbole_item_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(
        json.dumps({"item_id": "a", "title": "Red shoes", "categories": ["shoes", "red"]})
        + "\n\n"
        + json.dumps({"id": 7, "title": "Blue hat", "price": None})
        + "\n"
    )
    assert load_item_texts(jsonl) == {
        "a": "title: Red shoes; categories: shoes, red",
        "7": "title: Blue hat",
    }
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("item_id,title,brand\nx1,Green tea,Leafy\nx2,,Nobody\n")
    assert load_item_texts(csv_file) == {
        "x1": "title: Green tea; brand: Leafy",
        "x2": "brand: Nobody",
    }
    recbole = tmp_path / "ml.item"
    recbole.write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    )
    assert load_item_texts(recbole) == {
        "1": "movie_title: Toy Story; release_year: 1995; class: Animation Children's Comedy"
    }


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("no-id.csv", "title,brand\nTea,Leafy\n", "no item id field"),
        ("empty-id.csv", "item_id,title\n,Tea\n", "without an id"),
        ("bad.jsonl", '{"item_id": "a"}\nnot json\n', "line 2 is not JSON"),
        ("list.jsonl", "[1, 2]\n", "not a JSON object"),
        ("nothing.csv", "item_id,title\n", "holds no items"),
    ],
)
def test_a_bad_item_file_is_one_clear_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_item_texts(path)
    with pytest.raises(DataError, match="not found"):
        load_item_texts(tmp_path / "missing.csv")


def test_the_projection_recovers_a_linear_map_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = rng.normal(size=(500, 12)).astype(np.float32)
    weight = rng.normal(size=(12, 4)).astype(np.float32)
    bias = np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)
    projection = fit_projection(text, text @ weight + bias, ridge=1e-6)
    np.testing.assert_allclose(projection.weight, weight, atol=1e-3)
    np.testing.assert_allclose(projection.bias, bias, atol=1e-3)
    path = tmp_path / "p.npz"
    projection.save(path)
    again = Projection.load(path)
    np.testing.assert_array_equal(again.apply(text), projection.apply(text))
    with pytest.raises(DataError, match="cannot fit"):
        fit_projection(text[:0], text[:0])


def test_calibration_stretches_shrunken_predictions_to_the_targets_norm() -> None:
    rng = np.random.default_rng(1)
    text = rng.normal(size=(400, 8)).astype(np.float32)
    # A weak signal: the fit explains little, so its predictions huddle near the mean.
    target = (0.3 * text[:, :4] + rng.normal(size=(400, 4))).astype(np.float32)
    projection = fit_projection(text, target)
    shrunk = np.linalg.norm(projection.apply(text), axis=1).mean()
    want = np.linalg.norm(target, axis=1).mean()
    assert shrunk < 0.8 * want
    projection.calibrate(text, target)
    assert projection.scale > 1
    assert np.linalg.norm(projection.apply(text), axis=1).mean() == pytest.approx(want, rel=1e-3)
