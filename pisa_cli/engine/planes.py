"""Where the tiled VAE keeps whole-image activations: in RAM or in a temporary file.

A plane is one (C, H, W) activation, written and read in bands of whole rows. Every write
adds the band's per-channel sum and sum of squares to the plane (in float64), so once a layer
has written its output, the GroupNorm statistics of the whole image are known.

The disk store lays a plane out row by row as (H, C, W), so a band is one contiguous read
or write, and goes through pread/pwrite: the data sits in the page cache, not in the
process, and the working memory stays that of a few bands whatever the image size.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.bfloat16: np.int16,  # numpy has no bfloat16: keep the raw 16 bits
}


class Plane:
    """A (C, H, W) activation of the whole image with running per-channel statistics."""

    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype):
        self.channels, self.height, self.width, self.dtype = channels, height, width, dtype
        self.owned = True
        """False for planes that wrap a caller's tensor: release() leaves those alone."""
        self.sums = torch.zeros(channels, dtype=torch.float64)
        self.squares = torch.zeros(channels, dtype=torch.float64)

    @property
    def nbytes(self) -> int:
        return self.channels * self.height * self.width * self.dtype.itemsize

    def write(self, top: int, band: torch.Tensor) -> None:
        """Store rows ``top:top+h`` from a (C, h, W) band and add them to the statistics."""
        band = band.detach()
        var, mean = torch.var_mean(band.float(), dim=(1, 2), correction=0)
        # float64 on the CPU only: MPS has no float64.
        var, mean = var.cpu().double(), mean.cpu().double()
        count = band.shape[1] * band.shape[2]
        self.sums += mean * count
        self.squares += (var + mean.square()) * count
        self._write(top, band)

    def read(self, top: int, bottom: int, device: torch.device) -> torch.Tensor:
        """Rows ``top:bottom`` as a (C, h, W) tensor on ``device``."""
        return self._read(max(0, top), min(self.height, bottom)).to(device, non_blocking=True)

    def group_affine(
        self, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) per channel so that ``x * scale + shift`` is GroupNorm(x) with the
        mean and (biased) variance of the whole plane."""
        count = self.height * self.width * (self.channels // groups)
        mean = self.sums.view(groups, -1).sum(1) / count
        var = (self.squares.view(groups, -1).sum(1) / count - mean.square()).clamp_min(0)
        rstd = (var + eps).rsqrt()
        per_channel = self.channels // groups
        mean_c = mean.repeat_interleave(per_channel)
        rstd_c = rstd.repeat_interleave(per_channel)
        scale = weight.detach().cpu().double() * rstd_c
        shift = bias.detach().cpu().double() - mean_c * scale
        return scale, shift

    def release(self) -> None:
        """Free the storage (the statistics stay)."""

    def _write(self, top: int, band: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, top: int, bottom: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class RamPlane(Plane):
    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype, device):
        super().__init__(channels, height, width, dtype)
        self._data: torch.Tensor | None = torch.empty(
            channels, height, width, dtype=dtype, device=device
        )

    @classmethod
    def wrap(cls, tensor: torch.Tensor) -> RamPlane:
        """A plane over a (1, C, H, W) tensor, without copying it (statistics included)."""
        _, channels, height, width = tensor.shape
        plane = cls(channels, 0, width, tensor.dtype, tensor.device)
        plane.height, plane.owned, plane._data = height, False, tensor[0]
        flat = tensor[0].float().flatten(1)
        plane.sums = flat.sum(1).cpu().double()
        plane.squares = flat.square().sum(1).cpu().double()
        return plane

    def _write(self, top: int, band: torch.Tensor) -> None:
        assert self._data is not None
        self._data[:, top : top + band.shape[1]].copy_(band)

    def _read(self, top: int, bottom: int) -> torch.Tensor:
        assert self._data is not None
        return self._data[:, top:bottom]

    def tensor(self) -> torch.Tensor:
        assert self._data is not None
        return self._data

    def release(self) -> None:
        if self.owned:
            self._data = None


class DiskPlane(Plane):
    def __init__(self, channels: int, height: int, width: int, dtype: torch.dtype, folder: Path):
        super().__init__(channels, height, width, dtype)
        self._row = channels * width * dtype.itemsize
        handle, name = tempfile.mkstemp(prefix=".pisa-plane-", dir=folder)
        self._fd: int | None = handle
        self._path = Path(name)
        os.ftruncate(handle, self._row * height)

    def _write(self, top: int, band: torch.Tensor) -> None:
        assert self._fd is not None
        rows = band.to("cpu", self.dtype).permute(1, 0, 2).contiguous()
        if self.dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        rows = rows.numpy()
        view = memoryview(rows).cast("B")
        offset, done = top * self._row, 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def _read(self, top: int, bottom: int) -> torch.Tensor:
        assert self._fd is not None
        rows = np.empty((bottom - top, self.channels, self.width), dtype=_NUMPY[self.dtype])
        view = memoryview(rows).cast("B")
        offset, done = top * self._row, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"short read from {self._path}")
            done += got
        band = torch.from_numpy(rows)
        if self.dtype == torch.bfloat16:
            band = band.view(torch.bfloat16)
        return band.permute(1, 0, 2)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                self._path.unlink()

    def __del__(self) -> None:
        self.release()


class PlaneStore:
    """Makes planes in RAM (on ``device``) or in temporary files under ``folder``."""

    def __init__(self, kind: str = "ram", device: torch.device | str = "cpu", folder=None):
        if kind not in ("ram", "disk"):
            raise ValueError(f"store must be ram or disk, not {kind!r}")
        self.kind = kind
        self.device = torch.device(device)
        self.folder = Path(folder or tempfile.gettempdir())

    def new(self, channels: int, height: int, width: int, dtype: torch.dtype) -> Plane:
        if self.kind == "disk":
            return DiskPlane(channels, height, width, dtype, self.folder)
        return RamPlane(channels, height, width, dtype, self.device)
