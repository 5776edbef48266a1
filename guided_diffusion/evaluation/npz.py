"""
Streaming reads of one array from an .npz file, batch by batch, so that a 50k-image reference batch
(10 GB at 256x256) never has to sit in memory at once. Files are only read, never written.
"""

import zipfile

import numpy as np


def npz_keys(path):
    """
    :param path: an .npz file.
    :return: the names of the arrays it holds.
    :raises FileNotFoundError: when the file does not exist.
    :raises ValueError: when it is not an .npz (zip) file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except FileNotFoundError:
        raise FileNotFoundError(f"no such batch file: {path}") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file (expected the output of np.savez)") from None


class NpzArrayStream:
    """
    Iterate over the first axis of one array of an .npz file in batches.

    Use as a context manager; ``len(stream)`` is the number of rows, ``shape`` and ``dtype`` the
    array's. Fortran-ordered, object and unknown-format arrays are loaded whole instead.

    :param path: the .npz file.
    :param name: the array's name (e.g. "arr_0").
    """

    def __init__(self, *, path, name):
        self.path = path
        self.name = name
        if name not in npz_keys(path):
            raise ValueError(f"{path} has no array named {name!r}")
        self._archive = None
        self._member = None
        self._whole = None

    def __enter__(self):
        self._archive = zipfile.ZipFile(self.path)
        self._member = self._archive.open(f"{self.name}.npy")
        version = np.lib.format.read_magic(self._member)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(self._member)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(self._member)
        else:
            header = None
        if header is None or header[1] or header[2].hasobject:
            with np.load(self.path) as arrays:
                self._whole = np.ascontiguousarray(arrays[self.name])
            self.shape, self.dtype = self._whole.shape, self._whole.dtype
        else:
            self.shape, _, self.dtype = header
        if len(self.shape) == 0:
            raise ValueError(f"{self.name} in {self.path} is a scalar, expected an array of images")
        self._next_row = 0
        return self

    def __exit__(self, *exc):
        self._member.close()
        self._archive.close()

    def __len__(self):
        return self.shape[0]

    def _read_rows(self, count):
        if self._whole is not None:
            return self._whole[self._next_row : self._next_row + count]
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        wanted = count * row_bytes
        chunks, got = [], 0
        while got < wanted:
            chunk = self._member.read(wanted - got)
            if not chunk:
                raise ValueError(
                    f"{self.path}: {self.name} ends early (expected {len(self)} rows); "
                    "the file is truncated"
                )
            chunks.append(chunk)
            got += len(chunk)
        return np.frombuffer(b"".join(chunks), dtype=self.dtype).reshape(count, *self.shape[1:])

    def batches(self, batch_size):
        """
        :param batch_size: rows per batch; the last batch may be smaller.
        :return: a generator of numpy arrays, read sequentially from the start.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        while self._next_row < len(self):
            count = min(batch_size, len(self) - self._next_row)
            rows = self._read_rows(count)
            self._next_row += count
            yield rows


def peek_values(path, name="arr_0", rows=64):
    """
    The dtype, shape and value range of an array of an .npz file, the range read from its first
    rows only (a quick look, not a scan of a 10 GB batch).

    :return: (dtype, shape, smallest value, largest value); the values are None for an empty
        array.
    """
    with NpzArrayStream(path=path, name=name) as stream:
        first = next(stream.batches(rows), None)
        if first is None or first.size == 0:
            return stream.dtype, stream.shape, None, None
        return stream.dtype, stream.shape, first.min().item(), first.max().item()
