"""Decoded studies cached on disk, so that only the first epoch (of the first run) ever
touches DICOM.

One ``.npz`` per study holds every volume's pixels (integer pixels as int16/uint16, about the
size of the DICOM pixel data; uncompressed, because reading must be cheaper than decoding)
and geometry. Its name carries
a hash of the study folder (file names, sizes, modification times) and of the cache format,
so an edited study or a new format is decoded again instead of read stale. Writes go to a
temporary file that is renamed into place, so parallel workers or ranks never read a half
written file (`rsna_infer.output.atomic_write`).

``rsna-infer cache --data ROOT --cache DIR --workers N`` fills the cache before training
(decoding ~2,000 studies takes a while; better once, in parallel, than inside the first
epoch); under torchrun the ranks share whatever is left (`StudyCache.ensure` with
``shard``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..io.volume import Study, Volume
from ..output import atomic_write

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 2: per-slice native spacing kept; 3: native offsets, files, SOPInstanceUIDs


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of every file's relative path, size and mtime under ``folder`` (no contents read)."""
    folder = Path(folder)
    h = hashlib.sha1(f"format={CACHE_FORMAT}".encode())
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _compact(pixels: np.ndarray) -> np.ndarray:
    """Integer-valued pixels (the usual DICOM case) stored losslessly as int16/uint16."""
    if pixels.size and np.all(np.isfinite(pixels)):
        lo, hi = float(pixels.min()), float(pixels.max())
        if np.array_equal(pixels, np.round(pixels)):
            if 0 <= lo and hi <= 65535:
                return pixels.astype(np.uint16)
            if -32768 <= lo and hi <= 32767:
                return pixels.astype(np.int16)
    return pixels.astype(np.float32, copy=False)


def save_study(study: Study, path: str | Path) -> Path:
    """Write ``study`` to ``path`` (``.npz``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    vols_meta = []
    i = 0
    for series_type, vols in study.volumes.items():
        for v in vols:
            arrays[f"v{i}_pixels"] = _compact(v.pixels)
            arrays[f"v{i}_positions"] = v.positions
            arrays[f"v{i}_instance_numbers"] = v.instance_numbers
            for name in ("native_spacing", "native_offset"):
                if getattr(v, name) is not None:
                    arrays[f"v{i}_{name}"] = getattr(v, name)
            vols_meta.append({
                "type": series_type,
                "row_dir": v.row_dir.tolist(),
                "col_dir": v.col_dir.tolist(),
                "spacing": list(v.spacing),
                "study_id": int(v.study_id),
                "series_id": int(v.series_id),
                "description": v.description,
                "stack_index": int(v.stack_index),
                "files": v.files,
                "sop_instance_uids": v.sop_instance_uids,
            })
            i += 1
    meta = {"format": CACHE_FORMAT, "study_id": int(study.study_id), "warnings": list(study.warnings),
            "volumes": vols_meta, "types": list(study.volumes)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return atomic_write(path, lambda fh: np.savez(fh, **arrays), binary=True)


def load_cached_study(path: str | Path) -> Study:
    """Inverse of `save_study`."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: cache format {meta.get('format')} != {CACHE_FORMAT}")
        volumes: dict[str, list[Volume]] = {t: [] for t in meta["types"]}
        for i, vm in enumerate(meta["volumes"]):
            volumes.setdefault(vm["type"], []).append(Volume(
                pixels=z[f"v{i}_pixels"].astype(np.float32),
                positions=z[f"v{i}_positions"],
                row_dir=np.asarray(vm["row_dir"]),
                col_dir=np.asarray(vm["col_dir"]),
                spacing=tuple(vm["spacing"]),
                instance_numbers=z[f"v{i}_instance_numbers"],
                study_id=vm["study_id"],
                series_id=vm["series_id"],
                description=vm["description"],
                stack_index=vm["stack_index"],
                native_spacing=z[f"v{i}_native_spacing"] if f"v{i}_native_spacing" in z.files else None,
                native_offset=z[f"v{i}_native_offset"] if f"v{i}_native_offset" in z.files else None,
                files=vm.get("files"),
                sop_instance_uids=vm.get("sop_instance_uids"),
            ))
    return Study(study_id=int(meta["study_id"]), volumes=volumes, warnings=list(meta["warnings"]))


_POOL_CACHE: "StudyCache | None" = None


def _decode_into_cache(study_id: int, cache: "StudyCache | None" = None) -> str | None:
    """Decode one study into the cache; the error text when it fails (never raises)."""
    cache = cache or _POOL_CACHE
    assert cache is not None
    try:
        save_study(cache.loader(study_id), cache.path(study_id))
        return None
    except Exception as e:  # one broken study never stops the cache
        return f"study {study_id}: cannot be decoded ({type(e).__name__}: {e}); it is not cached"


class StudyCache:
    """Studies by id: from memory, else from the disk cache, else decoded by ``loader`` and
    written to the disk cache. ``memory_mb`` bounds the studies kept in this process."""

    def __init__(
        self,
        cache_dir: str | Path,
        loader: Callable[[int], Study],
        folder_of: Callable[[int], Path],
        memory_mb: float = 2048.0,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.loader = loader
        self.folder_of = folder_of
        self.memory_bytes = int(memory_mb * 2**20)
        self._mem: dict[int, Study] = {}
        self._mem_bytes = 0
        self._paths: dict[int, Path] = {}

    def path(self, study_id: int) -> Path:
        p = self._paths.get(study_id)
        if p is None:
            p = self.cache_dir / f"{study_id}-{folder_fingerprint(self.folder_of(study_id))}.npz"
            self._paths[study_id] = p
        return p

    def ensure(self, study_ids: list[int], progress: bool = True, workers: int = 0,
               shard: tuple[int, int] = (0, 1)) -> int:
        """Decode and cache every study not cached yet; returns how many were decoded.

        ``workers`` > 0 decodes in that many processes. ``shard=(rank, world_size)`` takes
        every ``world_size``-th of the missing studies (torchrun ranks share the work; each
        then waits for the others at a barrier). A study that cannot be decoded is logged and
        left out (training skips it with a warning)."""
        from tqdm.auto import tqdm

        rank, world = shard
        todo = [s for s in study_ids if not self.path(s).is_file()][rank::world]
        failed = 0
        bar = tqdm(total=len(todo), desc="cache studies", unit="study", disable=not progress or not todo)
        if workers > 0 and len(todo) > 1:
            import multiprocessing as mp

            global _POOL_CACHE
            _POOL_CACHE = self  # inherited by the forked workers
            with mp.get_context("fork").Pool(min(workers, len(todo))) as pool:
                for err in pool.imap_unordered(_decode_into_cache, todo):
                    failed += err is not None
                    if err:
                        logger.warning(err)
                    bar.update()
            _POOL_CACHE = None
        else:
            for sid in todo:
                err = _decode_into_cache(sid, self)
                failed += err is not None
                if err:
                    logger.warning(err)
                bar.update()
        bar.close()
        if todo:
            logger.info("cached %d decoded studies in %s%s", len(todo) - failed, self.cache_dir,
                        f" ({failed} failed, see the warnings)" if failed else "")
        return len(todo) - failed

    def get(self, study_id: int) -> Study:
        study_id = int(study_id)
        hit = self._mem.get(study_id)
        if hit is not None:
            return hit
        p = self.path(study_id)
        study = None
        if p.is_file():
            try:
                study = load_cached_study(p)
            except Exception as e:  # a corrupt cache entry is rebuilt, never fatal
                logger.warning("cache entry %s unreadable (%s); decoding the study again", p, e)
        if study is None:
            study = self.loader(study_id)
            save_study(study, p)
        size = study.nbytes()
        if self._mem_bytes + size <= self.memory_bytes:
            self._mem[study_id] = study
            self._mem_bytes += size
        return study
