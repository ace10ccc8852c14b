"""WebDataset shards (data.name=webdataset): tar files of samples, on disk or behind HTTP.

    data.train_shards: /data/in1k/train-{000000..001281}.tar    (or file://..., http(s)://...)
    data.val_shards:   /data/in1k/val-{000000..000049}.tar      the per-epoch validation
    data.test_shards:  optional; the final evaluation (null: val)

A sample is an image (jpg, jpeg, png or webp) and `cls`, its integer label as text (what
`python -m distcls.shard` writes, and timm and webdataset read). The training order, its streams
and resume are shard_plan.py's; the reading shard_source.py's.

Each shard's number of samples comes from `shards.json` in its folder (written by
`python -m distcls.shard`: {"class_names": [...], "counts": {"train-000000.tar": 1000, ...}}, names
beside it or full paths/URLs). Shards without it are counted once by the ranks together (each reads
its share of them through), and the counts are kept in the run's out_dir by full path or URL
(data.index: run.out_dir/shards.json by default), so a resume or requeue reads that file instead.
Class names: shards.json's (every one that names them must agree), else "0".."n-1" by the largest
training label.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from distcls.config import DataConfig
from distcls.data.datasets.registry import register_dataset
from distcls.data.file_source import crop_policy
from distcls.data.shard_plan import ShardSet
from distcls.data.shard_source import ShardSource, is_remote, iterate_samples, local_path, read_bytes, why
from distcls.data.sources import RawDataset
from distcls.errors import ConfigError, UserError
from distcls.runtime import dist
from distcls.runtime.atomic_files import atomic_write_text
from distcls.spec import printable_name

DESCRIPTION = "shards.json"  # beside the shards: class names and each shard's number of samples
SPLIT_KEYS = (("train", "train_shards"), ("val", "val_shards"), ("test", "test_shards"))


def expand(pattern: str, key: str) -> list[str]:
    """A brace pattern's shards, in order: '/d/train-{000..012}.tar' -> 13 paths (webdataset's braceexpand)."""
    from braceexpand import braceexpand
    try:
        urls = [u for part in pattern.split("::") for u in braceexpand(part.strip()) if u]
    except Exception as exc:  # noqa: BLE001  (an unbalanced brace and the like)
        raise ConfigError(
            f"data.{key}={pattern!r} is not a brace pattern ({why(exc)}); e.g. /data/in1k/train-{{000000..001281}}.tar"
        ) from None
    if not urls:
        raise ConfigError(f"data.{key}={pattern!r} names no shard; e.g. /data/in1k/train-{{000000..001281}}.tar")
    missing = [u for u in urls if not is_remote(u) and not Path(local_path(u)).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)})" if len(missing) > 1 else ""
        raise UserError(
            f"data.{key}: shard {missing[0]} does not exist{more}; check the pattern (its braces give {urls[0]} .. "
            f"{urls[-1]})"
        )
    return urls


def beside(url: str, name: str) -> str:
    """The file `name` in the folder (or URL path) of `url` (a shard, or a shards.json)."""
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


def read_description(location: str) -> dict:
    """{'class_names': [...] or None, 'counts': {shard URL: samples}} of a shards.json (empty if there
    is none). Its counts name shards by file name (beside it) or by full path or URL."""
    try:
        data = read_bytes(location)
    except Exception as exc:  # noqa: BLE001  (an HTTP error other than 403/404, a permission error)
        raise UserError(
            f"cannot read {location} ({why(exc)}); make it readable, or remove it to count the shards instead"
        ) from None
    if data is None:
        return {}
    try:
        desc = json.loads(data)
        counts = {
            (str(k) if "/" in str(k) else beside(location, str(k))): int(v) for k, v in desc.get("counts", {}).items()
        }
        names = desc.get("class_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names)):
            raise ValueError("class_names must be a list of names")
        if any(v < 0 for v in counts.values()):
            raise ValueError("a shard's count is negative")
        return {"class_names": [str(n) for n in names] if names is not None else None, "counts": counts}
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(
            f"{location} is not a shards description ({why(exc)}); remove it, or write it again with python -m "
            "distcls.shard"
        ) from None


def _count_share(urls: list, rank: int, world: int) -> dict:
    """This rank's share of the counting pass: {url: (samples, largest label)} or {url: error}."""
    out = {}
    for url in urls[rank::world]:
        n, top = 0, -1
        try:
            for sample in iterate_samples(url):
                n += 1
                if "cls" in sample:
                    try:
                        top = max(top, int(bytes(sample["cls"]).decode().strip()))
                    except (ValueError, UnicodeDecodeError):
                        pass  # a bad label is named when the sample is read
        except Exception as exc:  # noqa: BLE001
            out[url] = f"shard {url} cannot be read ({why(exc)}); fix or remove it"
            continue
        out[url] = (n, top)
    return out


def count(urls: list) -> dict:
    """Collective: {url: (samples, largest label)}, each shard read by one rank."""
    rank, world = dist.rank_and_world()
    merged = {}
    for share in dist.all_gather_object(_count_share(urls, rank, world)):
        merged.update(share)
    errors = [v for v in merged.values() if isinstance(v, str)]
    if errors:
        raise UserError(errors[0])
    return merged


@register_dataset("webdataset")
def build_webdataset(cfg: DataConfig) -> RawDataset:
    """Collective under a launcher when shards must be counted (each rank reads its share)."""
    if cfg.train_shards is None or cfg.val_shards is None:
        raise ConfigError(
            "data.name=webdataset needs data.train_shards and data.val_shards (brace patterns of tar shards, e.g. "
            "data.train_shards=/data/in1k/train-{000000..001281}.tar); write them from an image folder with "
            "python -m distcls.shard ROOT OUT"
        )
    if cfg.split is not None:
        raise ConfigError(
            "data.name=webdataset keeps its shards' splits; remove data.split (data.val_shards / test_shards name the "
            "others)"
        )
    patterns = {split: getattr(cfg, key) for split, key in SPLIT_KEYS if getattr(cfg, key) is not None}
    urls = {split: expand(pattern, f"{split}_shards") for split, pattern in patterns.items()}
    counts, names, named_by, notes = {}, None, None, []
    for location in dict.fromkeys(beside(u, DESCRIPTION) for split_urls in urls.values() for u in split_urls):
        desc = read_description(location)
        counts.update(desc.get("counts", {}))
        found_names = desc.get("class_names")
        if found_names is not None and names is not None and found_names != names:
            raise UserError(
                f"{location} and {named_by} name different classes ({len(found_names)} vs {len(names)}, or another "
                "order); the shards of one dataset need one list of class names"
            )
        if found_names is not None and names is None:
            names, named_by = found_names, location
    kept = Path(cfg.index) if cfg.index else None  # the run's own counts, from an earlier start
    if kept is not None and kept.is_file():
        desc = read_description(str(kept))
        counts = {**desc.get("counts", {}), **counts}
        names = names or desc.get("class_names")
    everything = [u for split in urls for u in urls[split]]
    uncounted = [u for u in dict.fromkeys(everything) if u not in counts]
    if uncounted or names is None:
        found = count(list(dict.fromkeys(uncounted if names is not None else everything)))
        counts.update({u: n for u, (n, _) in found.items()})
        if names is None:
            top = max((found[u][1] for u in urls["train"] if u in found), default=-1)
            if top < 1:
                raise UserError(f"the training shards {patterns['train']} hold no labels (.cls) of 2 or more classes; "
                                "every sample needs its integer label as NNN.cls")
            names = [str(i) for i in range(top + 1)]
        notes.append(f"webdataset: counted the samples of {len(found)} shards (read once, divided among the ranks); "
                     + _keep(kept, names, counts))
    if len(names) < 2:
        raise UserError(f"{DESCRIPTION} names {len(names)} class; a classifier needs at least 2")
    size, channels, policy = crop_policy(cfg)
    sources = {}
    for split, split_urls in urls.items():
        shards = ShardSet(tuple(split_urls), tuple(counts[u] for u in split_urls))
        if shards.total == 0:
            raise UserError(f"the {split} shards ({patterns[split]}) hold no samples")
        sources[split] = ShardSource(
            shards, len(names), size, channels, policy, cfg.skip_bad_images, cfg.shard_streams, cfg.shuffle_window
        )
    notes.append(
        f"webdataset: train {sources['train'].shards.total:,} samples in {len(urls['train'])} shards, val "
        f"{sources['val'].shards.total:,}"
        + (f", test {sources['test'].shards.total:,}" if "test" in sources else " (also the test split)")
        + f"; {cfg.shard_streams} streams"
    )
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    return RawDataset(train=sources["train"], val=sources["val"], test=sources.get("test", sources["val"]),
                      class_names=[printable_name(n) for n in names], mean=mean, std=std, notes=tuple(notes))


def _keep(kept: Optional[Path], names: list, counts: dict) -> str:
    """Rank 0 writes the counts where a restart finds them; the note says where (or why not)."""
    if kept is None:
        return f"put a {DESCRIPTION} beside the shards (python -m distcls.shard writes one) to skip this"
    if dist.is_main_rank():
        try:
            atomic_write_text(kept, json.dumps({"class_names": names, "counts": counts}, indent=1) + "\n")
        except OSError as exc:
            return f"not saved to {kept} ({exc.strerror or exc}): the next start counts again"
    return f"saved to {kept} (a restart reads it; copy it beside the shards as {DESCRIPTION} for other runs)"
