"""WebDataset shards as a dataset source: `ShardSource` (a ShardSet and how to turn a sample into an
image) and `ShardReader` (reads runs of samples from local paths, file:// or http(s):// URLs).

The tar format is read by the `webdataset` package (its tar iterator and sample grouping: a sample
is the members sharing a name before the extension, e.g. 000017.jpg and 000017.cls). A sample holds
one image (jpg, jpeg, png or webp) and `cls`, its integer label as text. What cannot be read (a
member that does not decode, a sample without image or label, a label out of range, a shard that
ends early or cannot be fetched) becomes a bad sample named by shard and member: the loader stops
with it, or drops it with data.skip_bad_images=true, as for image files. Nothing here raises for
bad data inside a DataLoader worker.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Optional

from distcls.data.file_source import CropPolicy
from distcls.data.shard_plan import ShardSet
from distcls.errors import ConfigError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
HTTP_TIMEOUT_S = 60  # a stalled server is an error after this long without a byte, never a hang


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def local_path(url: str) -> str:
    """The file a local path or file:// URL names (file:///a%20b, file://localhost/a: /a b, /a)."""
    if not url.startswith("file://"):
        return url
    rest = url[len("file://"):]
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return urllib.request.url2pathname(rest)


def open_url(url: str):
    """A readable binary stream of a shard: a local path, file:// or http(s):// (urllib: a timeout on every read)."""
    if is_remote(url):
        return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    return open(local_path(url), "rb")


def read_bytes(url: str) -> Optional[bytes]:
    """A small file beside the shards (their JSON), or None when there is none (a missing file; HTTP 404,
    or 403, which object stores answer for a missing key to a reader who may not list)."""
    try:
        with open_url(url) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404):
            return None
        raise


def iterate_samples(url: str) -> Iterator[dict]:
    """The samples of one shard in its order, each {'__key__': name, ext: bytes, ...}, through
    webdataset's tar iterator and grouping. Raises (OSError, tarfile.ReadError, ...) where the shard
    cannot be read on."""
    from webdataset import tariterators  # imported where shards are read (it imports a lot)
    stream = open_url(url)
    try:
        yield from tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def why(exc: BaseException) -> str:
    """An exception in a few words (HTTP errors with their status)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    text = (str(exc.args[0]) if getattr(exc, "args", None) else "") or type(exc).__name__
    return text.split(" @ ")[0].strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


class ShardReader:
    """Reads runs (shard, first, count) of a ShardSet, sequentially: one open shard is read on where
    the next run continues it; a run elsewhere opens its shard and reads past its first samples."""

    def __init__(self, shards: ShardSet):
        self.shards = shards
        self._open = None  # (shard, next sample number, iterator)
        self._failed: dict = {}  # shard -> (the sample it failed at, why): not asked again by this reader (this epoch)

    def close(self) -> None:
        if self._open is not None:
            self._open[2].close()
            self._open = None

    def read(self, run) -> list:
        """[(sample dict, or None with a message, key)] for the run's samples, in order."""
        shard, first, count = run
        url = self.shards.urls[shard]
        key0 = int(self.shards.offsets[shard])
        if shard in self._failed and first + count > self._failed[shard][0]:  # read up to where it failed, no further
            place, message = self._failed[shard]
            good = self.read((shard, first, place - first)) if place > first else []
            return good + [(None, message, key0 + p) for p in range(max(place, first), first + count)]
        if self._open is None or self._open[0] != shard or self._open[1] > first:
            self.close()
            self._open = [shard, 0, iterate_samples(url)]
        out, state = [], self._open
        while state[1] < first + count:
            place = state[1]
            try:
                sample = next(state[2])
            except StopIteration:
                sample = (
                    f"shard {url} ends after {place} samples, but holds {self.shards.counts[shard]} by its count "
                    "(a damaged or replaced shard)"
                )
            except Exception as exc:  # noqa: BLE001  (tarfile, OSError, HTTP errors: the shard cannot be read on)
                sample = f"shard {url} cannot be read past sample {place} ({why(exc)})"
            if isinstance(sample, str):  # the rest of the run is unreadable: each of its samples is a bad sample
                self.close()
                self._failed[shard] = (place, sample)
                out += [(None, f"{sample}", key0 + p) for p in range(max(place, first), first + count)]
                return out
            if place >= first:
                out.append((sample, None, key0 + place))
            state[1] += 1
        return out


@dataclass
class ShardSource:
    """WebDataset shards, decoded on demand to uint8 [C, size, size] (CropPolicy, as image files)."""
    shards: ShardSet
    num_classes: int
    size: int
    channels: int = 3
    policy: Optional[CropPolicy] = None
    skip_bad: bool = False
    streams: int = 16  # data.shard_streams
    window: int = 1000  # data.shuffle_window
    decoded_on_demand = True  # decoded by DataLoader workers when a batch needs them
    streamed = True  # read in shard order (shard_loader.py), never one sample at a time
    labels = None  # unknown until read: the label checks happen per sample

    def __len__(self) -> int:
        return self.shards.total

    def concat(self, other) -> "ShardSource":
        raise ConfigError(
            "data.name=webdataset keeps its shards' splits (data.train_shards / val_shards / test_shards); "
            "data.split cannot re-split them: remove data.split"
        )

    def decode(self, item, train: bool, seed: int, epoch: int):
        """(sample dict or None, message, key) -> (uint8 [C, s, s], label, key, None), or (None, -1, key, message) for a
        bad sample."""
        sample, bad, key = item
        if sample is None:
            return None, -1, key, bad
        from distcls.data.transforms.images import BadImage, decode_image
        name = f"{sample.get('__url__', '?')} member {sample.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "cls" not in sample:
            lacks = f"no image ({', '.join(IMAGE_EXTENSIONS)})" if ext is None else "no label (.cls)"
            return (
                None,
                -1,
                key,
                f"shard sample {name} has {lacks}; members: "
                f"{', '.join(sorted(k for k in sample if not k.startswith('__')))}",
            )
        try:
            label = int(bytes(sample["cls"]).decode().strip())
        except (ValueError, UnicodeDecodeError):
            return (
                None, -1, key, f"shard sample {name}: its .cls is not an integer label ({bytes(sample['cls'])[:20]!r})",
            )
        if not 0 <= label < self.num_classes:
            return (
                None,
                -1,
                key,
                f"shard sample {name}: label {label} is outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1})",
            )
        try:
            img = decode_image(bytes(sample[ext]), f"{name}.{ext}", self.channels)
        except BadImage as exc:
            return None, label, key, str(exc)
        return self.policy.apply(img, train, seed, epoch, key), label, key, None


def shard_name(url: str) -> str:
    """A shard's name in its folder's shards.json: the last part of its path or URL."""
    return url.rstrip("/").rsplit("/", 1)[-1]
