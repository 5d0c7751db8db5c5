"""The HDF5 feature cache: frozen-encoder tokens of every image of a split, computed once.

Layout of `features/<split>.h5` (FORMAT_VERSION 1):
  tokens   [N, T, D] float16, chunks of exactly one image (1, T, D), uncompressed
  names    [N] utf-8 strings: image file names without extension, in row order (sorted by file)
  attrs    format_version, encoder_id, num_tokens, num_prefix_tokens, width, grid (h, w),
           image_size (h, w)
`features/clipscore_<split>.h5`: `embeds` [N, E] float32 (the scoring CLIP's encode_image with its
own preprocess, not normalised), `names`, attrs format_version, model_id.

Files are byte-identical when re-made from the same images and weights (same machine): fixed
libver, no timestamps (track_times=False), no attribute that varies between runs. They are
written to a temp file beside the target and renamed only when complete (common/atomic.py).

Reading: one h5py fancy-index read of k rows is much slower than k single-row reads, so
`FeatureFile.read_rows` reads row by row into one preallocated array, each row's chunk copied
raw (`read_direct_chunk`) since it is uncompressed.
"""
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from common.atomic import atomic_path
from common.errors import InputError
from common.imageio import image_loader, image_names, report_skip

FORMAT_VERSION = 1
LIBVER = ("v110", "v110")     # fixed, so the file layout cannot change with the h5py default
_STR = h5py.string_dtype("utf-8")


class FeatureFileError(InputError):
    """A feature file that cannot be used; str() names the file and the problem."""


def _write_h5(path, dataset, row_shape, dtype, encode, transform, image_paths, attrs, *,
              batch_size, num_workers, device, skip_unreadable, desc, ranks=None):
    """Encode every image with `encode(pixels) -> [B, *row_shape]` and write `dataset` + `names`.

    An unreadable image raises ImageReadError (naming the file) unless `skip_unreadable`, which
    leaves it out of the file after a one-line report. Returns the list of skipped paths.

    ranks (common.distributed.Ranks, under torchrun): each rank encodes its blocks of
    `batch_size` images (block b: rank b % world_size), exactly the batches one process makes;
    rank 0 gathers them block by block and alone writes the file, with the same writes in the
    same order as one process (the same bytes for the same rows). It returns every skipped
    path, the other ranks their own."""
    image_paths = [Path(p) for p in image_paths]
    names = image_names(image_paths)
    n = len(image_paths)
    if n == 0:
        raise FeatureFileError(f"{path}: no images to encode")
    mine = range(n) if ranks is None else ranks.blocks(n, batch_size)
    loader = image_loader([image_paths[i] for i in mine], transform, batch_size=batch_size,
                          num_workers=num_workers)
    encoded = _encoded(loader, mine, encode, dataset, row_shape, dtype, image_paths, path, device,
                       skip_unreadable)
    if ranks is not None:
        encoded = _gathered(encoded, ranks, -(-n // batch_size))
        if not ranks.is_main:
            return [p for _, _, skipped, _ in encoded for p in skipped]
    kept, skipped = [], []
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", libver=LIBVER) as f:
            ds = f.create_dataset(dataset, shape=(n, *row_shape), maxshape=(None, *row_shape),
                                  dtype=dtype, chunks=(1, *row_shape), track_times=False)
            row = 0
            with tqdm(total=n, desc=desc or Path(path).name, unit="img") as bar:
                for indices, out, errors, count in encoded:
                    skipped.extend(errors)
                    if out is not None:
                        ds[row:row + len(out)] = out
                        row += len(out)
                        kept.extend(indices)
                    bar.update(count)
            if row == 0:
                raise FeatureFileError(f"{path}: none of the {n} images could be read")
            if row < n:
                ds.resize(row, axis=0)
            f.create_dataset("names", data=np.array([names[i] for i in kept], dtype=object),
                             dtype=_STR, track_times=False)
            f.attrs["format_version"] = FORMAT_VERSION
            for k, v in attrs.items():
                f.attrs[k] = v
    return skipped


def _encoded(loader, positions, encode, dataset, row_shape, dtype, image_paths, path, device,
             skip_unreadable):
    """Per batch of `loader` (over image_paths[positions]): (indices into image_paths of the
    encoded images, their rows as a numpy array or None, paths of the skipped images, images)."""
    for batch in loader:
        if batch.errors:
            if not skip_unreadable:
                raise batch.errors[0]
            for e in batch.errors:
                report_skip(e)
        indices = [positions[i] for i in batch.indices]
        out = None
        if batch.pixels is not None:
            with torch.inference_mode():
                out = encode(batch.pixels.to(device))
                out = out.to(dtype=torch.float16 if dtype == np.float16 else torch.float32)
                out = out.cpu().numpy()
            if out.shape[1:] != tuple(row_shape):
                raise FeatureFileError(f"{path}: encoder gave rows {out.shape[1:]}, "
                                       f"expected {tuple(row_shape)}")
            if not np.isfinite(out).all():
                bad = [str(image_paths[i]) for i, o in zip(indices, out)
                       if not np.isfinite(o).all()]
                raise FeatureFileError(f"{path}: non-finite {dataset} (overflow in "
                                       f"{np.dtype(dtype).name}?) for {bad[:5]}")
        yield indices, out, [e.path for e in batch.errors], len(batch.indices) + len(batch.errors)


def _gathered(encoded, ranks, n_blocks):
    """The batches of every rank, in block order, on rank 0 (the others get their own): in each
    round every rank sends its next block (block round * world_size + rank) to rank 0."""
    for start in range(0, n_blocks, ranks.world_size):
        own = next(encoded) if start + ranks.rank < n_blocks else None
        gathered = ranks.gather(own)
        if ranks.is_main:
            yield from (item for item in gathered if item is not None)
        elif own is not None:
            yield own


def write_features(path, encoder, image_paths, encoder_id, *, batch_size=32, num_workers=0,
                   device="cpu", skip_unreadable=False, desc=None, ranks=None):
    """Tokens of every image (in the given order) by a frozen ImageEncoder into `path`.

    Returns the list of skipped (unreadable) image paths; empty unless skip_unreadable.
    ranks: under torchrun, every rank encodes its share and rank 0 writes the file (_write_h5)."""
    attrs = {
        "encoder_id": encoder_id,
        "num_tokens": encoder.num_tokens,
        "num_prefix_tokens": encoder.num_prefix_tokens,
        "width": encoder.width,
        "grid": np.array(encoder.grid, dtype=np.int64),
        "image_size": np.array(encoder.image_size, dtype=np.int64),
    }
    return _write_h5(path, "tokens", (encoder.num_tokens, encoder.width), np.float16, encoder,
                     encoder.preprocess, image_paths, attrs, batch_size=batch_size,
                     num_workers=num_workers, device=device, skip_unreadable=skip_unreadable,
                     desc=desc, ranks=ranks)


def write_clip_embeddings(path, clip_model, preprocess, image_paths, model_id, *, batch_size=32,
                          num_workers=0, device="cpu", skip_unreadable=False, desc=None,
                          ranks=None):
    """`clip_model.encode_image` (float32, not normalised) of every image into `path` (ranks: as
    write_features)."""
    embed_dim = int(clip_model.visual.output_dim)
    return _write_h5(path, "embeds", (embed_dim,), np.float32, clip_model.encode_image,
                     preprocess, image_paths, {"model_id": model_id}, batch_size=batch_size,
                     num_workers=num_workers, device=device, skip_unreadable=skip_unreadable,
                     desc=desc, ranks=ranks)


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found (run the extract stage)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({e})") from e


def _read_names(f, path, dataset):
    for key in (dataset, "names"):
        if key not in f:
            raise FeatureFileError(f"{path}: no dataset {key!r} (has {sorted(f.keys())})")
    version = f.attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise FeatureFileError(f"{path}: format_version {version}, expected {FORMAT_VERSION}; "
                               "re-run the extract stage")
    names = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f["names"][()]]
    if len(names) != f[dataset].shape[0]:
        raise FeatureFileError(f"{path}: {len(names)} names for {f[dataset].shape[0]} rows")
    return names


def read_embeddings(path, model_id=None):
    """(names, float32 array [N, E]) of a clipscore_<split>.h5 file; with `model_id`, the file
    must have been made by that CLIP (`encoder_id` of its EncoderConfig)."""
    with _open(path) as f:
        names = _read_names(f, path, "embeds")
        made_by = str(f.attrs.get("model_id"))
        if model_id is not None and made_by != model_id:
            raise FeatureFileError(f"{path}: made by CLIP {made_by}, not by the scoring CLIP "
                                   f"{model_id}; re-run the extract stage")
        return names, f["embeds"][()].astype(np.float32, copy=False)


class FeatureFile:
    """Read access to features/<split>.h5 for training and decoding.

    The h5py handle is opened lazily and re-opened in a new process, so a FeatureFile can be
    handed to DataLoader workers (h5py handles must not cross a fork). With in_memory=True the
    whole tokens array is read once into RAM (N * T * D * 2 bytes: demo train 50 MB, course
    train ViT-L/14 5.6 GB) and rows are served from there."""

    def __init__(self, path, in_memory=False):
        self.path = Path(path)
        with _open(self.path) as f:
            self.names = _read_names(f, self.path, "tokens")
            ds = f["tokens"]
            if ds.dtype != np.float16 or ds.ndim != 3:
                raise FeatureFileError(f"{self.path}: tokens must be float16 [N, T, D], "
                                       f"got {ds.dtype} {ds.shape}")
            self.shape = ds.shape
            self._raw_chunks = (ds.chunks == (1, *ds.shape[1:]) and ds.dtype.str == "<f2"
                                and ds.id.get_create_plist().get_nfilters() == 0)
            self.encoder_id = str(f.attrs["encoder_id"])
            self.num_prefix_tokens = int(f.attrs["num_prefix_tokens"])
            self.grid = tuple(int(g) for g in f.attrs["grid"])
            self.image_size = tuple(int(s) for s in f.attrs["image_size"])
            self._ram = None
            if in_memory:
                arr = np.empty(ds.shape, dtype=np.float16)
                ds.read_direct(arr)
                self._ram = arr
        self.num_tokens, self.width = self.shape[1], self.shape[2]
        if self.num_prefix_tokens + self.grid[0] * self.grid[1] != self.num_tokens:
            raise FeatureFileError(f"{self.path}: grid {self.grid} + {self.num_prefix_tokens} "
                                   f"prefix tokens != {self.num_tokens} tokens")
        self._index = {n: i for i, n in enumerate(self.names)}
        self._file, self._pid, self._ds = None, None, None

    def __len__(self):
        return self.shape[0]

    def index_of(self, name):
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"{self.path}: no image named {name!r}") from None

    def require_encoder(self, encoder_id):
        if encoder_id != self.encoder_id:
            raise FeatureFileError(f"{self.path}: made by encoder {self.encoder_id}, "
                                   f"expected {encoder_id}; re-run the extract stage")

    def _tokens(self):
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            self._ds = self._file["tokens"]   # cached: a group lookup costs as much as a small read
        return self._ds

    def _check(self, i):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: row {i} out of range [0, {n})")
        return i % n

    def __getitem__(self, i):
        """torch.float16 [T, D] of row i."""
        return self.read_rows([i])[0]

    def all_rows(self):
        """torch.float16 [N, T, D] of every row; in memory, the array itself (no second copy)."""
        if self._ram is not None:
            return torch.from_numpy(self._ram)
        return self.read_rows(range(len(self)))

    def read_rows(self, indices):
        """torch.float16 [len(indices), T, D]; indices in any order, repeats allowed."""
        idx = [self._check(int(i)) for i in indices]
        if self._ram is not None:
            return torch.from_numpy(self._ram[idx])   # numpy's take: fastest measured on fp16 rows
        out = np.empty((len(idx), *self.shape[1:]), dtype=np.float16)
        ds = self._tokens()
        if self._raw_chunks:
            # One uncompressed chunk per row holds exactly the row's bytes: copy them straight in,
            # bypassing h5py's selection machinery (faster than read_direct).
            flat = out.reshape(len(idx), -1).view(np.uint8)
            for j, i in enumerate(idx):
                ds.id.read_direct_chunk((i, 0, 0), out=flat[j])
        else:
            for j, i in enumerate(idx):
                ds.read_direct(out, source_sel=np.s_[i], dest_sel=np.s_[j])
        return torch.from_numpy(out)

    def close(self):
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid, self._ds = None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"], state["_ds"] = None, None, None   # h5py handles do not pickle
        return state


class FileRows:
    """A FeatureFile's tokens indexed like the in-memory table [N, T, D], but read from the file
    at each access: `rows[LongTensor]` [k, T, D], `rows[i]` [T, D], float16 on the CPU. What a
    training rank under torchrun reads its batch shares through, so that no process holds the
    whole table (the OS page cache keeps one copy of the file for all the ranks of a machine)."""
    device = torch.device("cpu")

    def __init__(self, features):
        self.features = features
        self.shape = features.shape

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            index = int(index)
        if isinstance(index, int):
            return self.features[index]
        return self.features.read_rows(torch.as_tensor(index).tolist())
