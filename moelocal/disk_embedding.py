"""The embedding table read from the model's file a row at a time. A token needs one row of it, so
where the experts stream (a CPU budget that cannot hold them all) the table's memory is better
spent on expert slots: 125 MiB for mixtral-large, 1.1 GiB for gpt-oss's 201k-token vocabulary.
Rows are read with pread through the page cache, which keeps frequent tokens' rows while memory
allows (and gives them back when it does not); a row costs a few microseconds against a decoded
token's tens of milliseconds of expert reads.
"""

import os
from pathlib import Path

import torch
from torch import nn

from .direct_io import read_at
from .errors import MoelocalError, reason
from .store import tensor_bytes

AVAILABLE = hasattr(os, "pread")


class DiskEmbedding(nn.Module):
    """nn.Embedding's forward over a (vocab, dim) tensor stored row-major at a file offset,
    each row cast to the compute dtype as it is read (the same values a resident table holds)."""

    def __init__(self, path: Path, offset: int, stored: torch.dtype, shape: tuple, dtype):
        super().__init__()
        self.path, self.offset, self.stored, self.dtype = Path(path), offset, stored, dtype
        self.vocab, self.dim = shape
        self.row_bytes = self.dim * stored.itemsize
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise MoelocalError(f"{self.path}: {reason(e)}") from None
        if os.fstat(self.fd).st_size < offset + self.vocab * self.row_bytes:
            self.close()
            raise MoelocalError(f"{self.path}: truncated (the embedding table ends past its end)")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(tokens.reshape(-1), return_inverse=True)
        rows = torch.empty(len(unique), self.dim, dtype=self.stored)
        view, size = tensor_bytes(rows, len(unique) * self.row_bytes), self.row_bytes
        for i, token in enumerate(unique.tolist()):
            got = read_at(self.fd, view[i * size : (i + 1) * size], self.offset + token * size)
            if got != size:  # the file shrank under us
                raise MoelocalError(f"{self.path}: ends inside the embedding table's row {token}")
        return rows.to(self.dtype)[inverse].view(*tokens.shape, self.dim)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def extra_repr(self) -> str:
        return f"{self.vocab}, {self.dim}, read from {self.path.name} at offset {self.offset}"
