import numpy as np
import pytest

from mblm.data.corpus import open_corpus, window_split
from mblm.data.types import ModelMode


def write(folder, name, size, seed=0):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def test_hash_split_partitions_every_window_deterministically(tmp_path):
    for i in range(5):
        write(tmp_path, f"d{i % 2}/f{i}.bin", 10_000 + 37 * i, seed=i)
    (tmp_path / ".hidden").write_bytes(b"x" * 10_000)  # hidden files are not corpus
    counts = {m: open_corpus("bytes", str(tmp_path), 64, m).num_windows for m in ModelMode}
    total = sum((10_000 + 37 * i) // 64 for i in range(5))
    assert sum(counts.values()) == total
    assert counts[ModelMode.TRAIN] > 10 * counts[ModelMode.VALID] > 0
    assert window_split("d0/f0.bin", 640) == window_split("d0/f0.bin", 640)
    corpus = open_corpus("bytes", str(tmp_path), 64, ModelMode.VALID)
    data = corpus.files[0].read_bytes()
    windows = list(corpus.windows(str(corpus.files[0]), data))
    offsets = corpus.offsets(corpus.files[0], len(data))
    assert [w.tobytes() for w in windows] == [data[o : o + 64] for o in offsets]


def test_pg19_layout_splits_by_folder(tmp_path):
    for split, n in (("train", 3), ("validation", 1), ("test", 1)):
        for i in range(n):
            write(tmp_path, f"{split}/{i}.txt", 1000, seed=i)
    write(tmp_path, "train/ignored.bin", 1000)
    train = open_corpus("pg19", str(tmp_path), 100, ModelMode.TRAIN)
    assert [p.name for p in train.files] == ["0.txt", "1.txt", "2.txt"]
    assert train.num_windows == 30
    assert open_corpus("pg19", str(tmp_path), 100, ModelMode.VALID).num_windows == 10


def test_stdlib_corpus_exists_everywhere():
    corpus = open_corpus("stdlib", "ignored", 512, ModelMode.VALID)
    assert len(corpus.files) > 100 and corpus.num_windows > 100


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no files in"),
        (lambda p: write(p, "small.bin", 50), r"no train window of input_seq_len=64 bytes"),
    ],
)
def test_bad_corpora_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(ValueError, match=message):
        open_corpus("bytes", str(tmp_path), 64, ModelMode.TRAIN)


def test_missing_folders_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_dir not found"):
        open_corpus("bytes", str(tmp_path / "nope"), 64, ModelMode.TRAIN)
    with pytest.raises(FileNotFoundError, match=r"validation is missing"):
        (tmp_path / "train").mkdir()
        open_corpus("pg19", str(tmp_path), 64, ModelMode.VALID)
