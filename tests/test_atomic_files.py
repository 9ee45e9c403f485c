"""One atomic writer for every file: whole files only, no shared temporary names, cache entries safe to race."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_kedit.files import (
    atomic_directory,
    atomic_path,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    exclusive_build,
)

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_kedit"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_finished_files_and_folders_get_the_ordinary_mode(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    assert atomic_write_text(tmp_path / "a.txt", "x").stat().st_mode & 0o777 == 0o666 & ~mask
    with atomic_directory(tmp_path / "folder"):
        pass
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask


def test_threads_writing_one_file_never_share_a_temporary(tmp_path):
    """Threads of one process (one pid) write the same target at once: every write completes whole."""
    target = tmp_path / "entry.json"
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for round_ in range(30):
                barrier.wait()
                atomic_write_json(target, {"writer": index, "round": round_, "pad": "x" * 20_000})
        except BaseException as err:  # reported below, with the thread's error
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert json.loads(target.read_text())["round"] == 29
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.json"]


def test_atomic_directory_keeps_the_folder_that_came_first(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("first")
    with atomic_directory(target) as tmp:  # another process finished first: its folder stays
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    with atomic_directory(target, replace=True) as tmp:  # an export asked to overwrite
        (tmp / "config.json").write_text("third")
    assert (target / "config.json").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _slow_replace() -> None:
    # Widens the window between a writer's temporary file and its rename to 0.2 s, so that two processes
    # that write one cache entry at once overlap there every time (as DDP ranks on an empty cache do).
    replace = os.replace

    def slow(src, dst, *args, **kwargs):
        time.sleep(0.2)
        return replace(src, dst, *args, **kwargs)

    os.replace = slow  # type: ignore[assignment]


def _build_entries(cache: str, barrier, results) -> None:  # runs in a child process
    os.environ["KEDIT_CACHE"] = cache
    torch.set_num_threads(1)
    from tiny_models import tiny_model, tiny_tokenizer

    from lightning_kedit.editing.prefixes import _MEMO, context_templates
    from lightning_kedit.statistics import KeyStatistics

    _slow_replace()
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    try:
        for seed in range(3):
            _MEMO.clear()
            barrier.wait(timeout=120)
            context_templates(model, tokenizer, [(4, 2)], seed=seed)
        statistics = KeyStatistics([1, 2], key_size=8)
        keys = torch.arange(16, dtype=torch.float64).reshape(2, 8)
        statistics.update(1, keys)
        statistics.update(2, keys)
        barrier.wait(timeout=120)
        statistics.save(Path(cache) / "stats" / "entry.safetensors", fingerprint={"model": "tiny"})
        barrier.wait(timeout=120)
        atomic_save_safetensors({"v": torch.ones(3)}, Path(cache) / "targets" / "one.safetensors")
        barrier.wait(timeout=120)
        with exclusive_build(Path(cache) / "built"):
            marker = Path(cache) / "built" / "count.txt"
            count = int(marker.read_text()) if marker.is_file() else 0
            time.sleep(0.1)
            atomic_write_text(marker, str(count + 1))
        results.put("ok")
    except BaseException as err:
        results.put(f"{type(err).__name__}: {err}")
        raise


def test_two_processes_build_the_same_cache_entries_at_once(tmp_path):
    """Two processes on an empty cache write prefixes, statistics and target entries at the same moments."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_build_entries, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    outcomes = [results.get(timeout=5) for _ in processes]
    assert outcomes == ["ok", "ok"], outcomes
    assert all(process.exitcode == 0 for process in processes)

    prefixes = sorted((tmp_path / "prefixes").glob("*.json"))
    assert len(prefixes) == 3
    for path in prefixes:
        templates = json.loads(path.read_text())["templates"]
        assert templates[0] == "{}" and len(templates) == 3
    from lightning_kedit.statistics import KeyStatistics

    loaded = KeyStatistics.load(tmp_path / "stats" / "entry.safetensors")
    assert loaded.layers == [1, 2] and loaded.count(1) == 2
    # The exclusive builders took turns: the second read the first one's count.
    assert (tmp_path / "built" / "count.txt").read_text() == "2"
    leftovers = [p for p in tmp_path.rglob(".*") if p.suffix == ".tmp"]
    assert not leftovers, leftovers


def test_one_atomic_writer_in_the_package():
    """Every rename into place is in files.py: no module writes its own temporary file."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "files.py":
            continue
        text = "\n".join(line for line in path.read_text().splitlines() if ">>>" not in line)  # not examples
        for needle in ("os.replace(", ".rename(", "mkstemp(", "mkdtemp(", ".tmp\"", ".partial"):
            if needle in text:
                offenders.append(f"{path.relative_to(PACKAGE)}: {needle}")
    assert not offenders, offenders
