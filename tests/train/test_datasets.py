import pytest
import torch

from mblm.data.datasets import DistributedDataset
from mblm.data.types import BatchWithLossMask


class Numbers(DistributedDataset[BatchWithLossMask]):
    def __init__(self, size: int, **kw):
        self.data = list(range(size))
        super().__init__(data_size=size, is_sequential=True, **kw)

    def get_sample(self, from_idx: int) -> BatchWithLossMask:
        x = torch.tensor(self.data[from_idx : from_idx + self.seq_len])
        return x, torch.ones_like(x)


def test_workers_get_equal_disjoint_slices():
    shards = [Numbers(103, seq_len=5, worker_id=w, num_workers=3) for w in range(3)]
    assert [len(s) for s in shards] == [6, 6, 6]  # 34 elements per worker -> 6 windows
    firsts = [int(s[0][0][0]) for s in shards]
    assert firsts == [0, 34, 68]
    assert shards[1][5][0].tolist() == [59, 60, 61, 62, 63]
    with pytest.raises(IndexError):
        shards[0][6]


def test_offset_shifts_windows_and_can_shorten_the_dataset():
    ds = Numbers(20, seq_len=5, worker_id=0, num_workers=1)
    assert len(ds) == 4
    ds.offset_to(7)  # modulo seq_len -> 2
    assert ds.sample_offset == 2 and len(ds) == 3
    assert ds[0][0].tolist() == [2, 3, 4, 5, 6]
    ds.offset_one()
    assert ds[0][0].tolist() == [3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"size": 8, "seq_len": 5, "worker_id": 0, "num_workers": 2}, "dataset too small"),
        ({"size": 80, "seq_len": 5, "worker_id": 2, "num_workers": 2}, r"worker_id must be"),
        ({"size": 80, "seq_len": 0, "worker_id": 0, "num_workers": 1}, "seq_len must be"),
    ],
)
def test_bad_arguments_are_clear_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        Numbers(**kw)
