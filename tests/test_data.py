import numpy as np
import pytest

from edgecl.models.data import DataError, load_npz, load_stream, permuted_digits, split_digits


def test_split_digits_tasks_and_split():
    s = split_digits(0)
    assert [t.classes for t in s.tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert s.input_shape == (1, 8, 8)
    total = sum(len(t.x_train) + len(t.x_test) for t in s.tasks)
    assert total == 1797  # every digit is in exactly one task and one split
    for t in s.tasks:
        assert set(np.unique(t.y_train)) == {0, 1} and set(np.unique(t.y_test)) == {0, 1}
        assert 0.2 < len(t.x_test) / (len(t.x_train) + len(t.x_test)) < 0.3
        assert t.x_train.dtype == np.float32 and 0 <= t.x_train.min() and t.x_train.max() <= 1


def test_split_is_seeded():
    a, b, c = split_digits(0), split_digits(0), split_digits(1)
    assert np.array_equal(a.tasks[2].x_test, b.tasks[2].x_test)
    assert not np.array_equal(a.tasks[2].x_test, c.tasks[2].x_test)


def test_permuted_digits():
    p = permuted_digits(4, seed=0)
    assert len(p) == 4 and all(t.classes == list(range(10)) for t in p.tasks)
    # same images, different fixed permutation per task
    a, b = p.tasks[0].x_test.reshape(-1, 64), p.tasks[1].x_test.reshape(-1, 64)
    assert np.array_equal(np.sort(a, axis=1), np.sort(b, axis=1))
    assert not np.array_equal(a, b)
    assert np.array_equal(permuted_digits(4, seed=0).tasks[3].x_train, p.tasks[3].x_train)
    assert not np.array_equal(permuted_digits(4, seed=1).tasks[3].x_train, p.tasks[3].x_train)


def test_load_npz_with_and_without_task(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 6, 200)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    s = load_npz(tmp_path / "plain.npz")
    assert [t.classes for t in s.tasks] == [[0, 1], [2, 3], [4, 5]]
    assert s.input_shape == (1, 28, 28)
    assert s.tasks[0].x_train.max() <= 1.0
    np.savez(tmp_path / "tasks.npz", x=x.reshape(200, -1).astype(np.float32), y=y, task=y % 2)
    s = load_stream(str(tmp_path / "tasks.npz"))
    assert [t.name for t in s.tasks] == ["task-0", "task-1"]
    assert s.tasks[1].classes == [1, 3, 5]


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((3, 4))}, "missing array 'y'"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(2, dtype=int)}, "same"),
    ({"x": np.zeros((3, 4)), "y": np.zeros(3)}, "integer"),
    ({"x": np.full((3, 4), np.nan), "y": np.zeros(3, dtype=int)}, "NaN"),
])
def test_load_npz_errors_name_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as e:
        load_npz(path)
    assert str(path) in str(e.value)


def test_unknown_data_and_task_count():
    with pytest.raises(DataError, match="unknown data"):
        load_stream("cifar")
    with pytest.raises(DataError, match="outside 1..5"):
        load_stream("split-digits", n_tasks=6)
    with pytest.raises(DataError, match="no such file"):
        load_stream("/nonexistent/file.npz")
