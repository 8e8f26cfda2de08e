"""``TensorSource.read``: rows are read only from inside the tensor, never from a neighbour's bytes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from adapterfmt.errors import ShapeMismatchError
from adapterfmt.storage.header import read_header
from adapterfmt.storage.tensor_source import TensorSource


def test_rows_inside_the_tensor_are_read_and_rows_past_it_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    first = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_file({"a": first, "b": torch.full((4, 3), 7.0)}, str(path))  # "b" lies right after "a" in the file
    info = read_header(path).tensors["a"]
    with TensorSource() as source:
        assert torch.equal(source.read(info, (1, 3)), first[1:3])
        assert torch.equal(source.read(info, (0, 4)), first)
        for rows in ((2, 6), (3, 2), (-1, 2)):
            with pytest.raises(ShapeMismatchError, match="rows") as e:
                source.read(info, rows)
            assert e.value.key == "a"
