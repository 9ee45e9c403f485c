"""Serving under load while edits land: latency, throughput and failures before, during and after live edits.

Starts ``kedit serve`` (2 generation workers) on a fresh history folder, runs ``--clients`` concurrent clients
sending greedy completions of CounterFact prompts, and measures three phases: ``--seconds`` before any edit,
while ``--edits`` edits of ``--facts`` facts each are submitted one after the other (the phase lasts until the
last one is committed), and ``--seconds`` after. Per phase: requests, failed requests, p50/p99 latency,
requests/s and generated tokens/s, the weights versions served. Also each edit's wall time and efficacy, and
the peak resident memory of all the server's processes together (sampled every 0.5 s from /proc).

Run under the heavy lock (about 15 minutes on a 2-core VM):

    flock /tmp/kedit-heavy.lock .venv/bin/python benchmarks/serve_load.py --out benchmarks/results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's server helper

from machine import describe_machine
from serve_helpers import WRITE_KEY, Server, call

from lightning_kedit.files import atomic_write_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-val.json"


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the process group ``pgid`` (Linux /proc), in MiB."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) == pgid:  # field 5 of stat: the process group
                total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * page
        except (OSError, ValueError):
            continue
    return total / 2**20


class Load:
    """``clients`` threads sending completions until stopped; every response is recorded with its phase."""

    def __init__(self, port: int, prompts: list[str], clients: int, max_tokens: int) -> None:
        self.port, self.prompts, self.max_tokens = port, prompts, max_tokens
        self.phase = "warmup"
        self.records: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            prompt = self.prompts[n % len(self.prompts)]
            n += 1
            phase, start = self.phase, time.monotonic()
            try:
                status, body = call(self.port, "POST", "/v1/completions",
                                    {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0}, timeout=600)
            except OSError as err:
                status, body = -1, str(err)
            record = {"phase": phase, "start": start, "seconds": time.monotonic() - start, "status": status}
            if status == 200:
                record.update(version=body["kedit_version"], tokens=body["usage"]["completion_tokens"])
            self.records.append(record)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=900)


def summarise(records: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    latencies = sorted(r["seconds"] for r in ok)

    def quantile(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) if latencies else None

    return {
        "seconds": round(seconds, 1), "requests": len(records), "failed": len(records) - len(ok),
        "p50_s": quantile(0.50), "p99_s": quantile(0.99),
        "mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
        "requests_per_s": round(len(ok) / seconds, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / seconds, 2),
        "versions": sorted({r["version"] for r in ok}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the before and after phases")
    parser.add_argument("--edits", type=int, default=3)
    parser.add_argument("--facts", type=int, default=10, help="facts per edit")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", default=str(DATA))
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()

    records = json.loads(Path(args.requests).read_text())[: args.edits * args.facts]
    prompts = [r["prompt"].replace("{}", r["subject"]) for r in records]
    with tempfile.TemporaryDirectory() as folder:
        server = Server(args.model, Path(folder) / "history", workers=args.workers, stop_after=7200,
                        log=Path(folder) / "serve.log")
        started = time.monotonic()
        server.wait_ready(timeout=900)
        startup = time.monotonic() - started
        peak = {"mb": group_rss_mb(server.process.pid)}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                peak["mb"] = max(peak["mb"], group_rss_mb(server.process.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(server.port, prompts, args.clients, args.max_tokens)
        try:
            load.start()
            time.sleep(10)  # warm-up: not measured
            phases: dict[str, float] = {}
            load.phase, mark = "before", time.monotonic()
            time.sleep(args.seconds)
            phases["before"] = time.monotonic() - mark
            load.phase, mark = "during", time.monotonic()
            edits = []
            for k in range(args.edits):
                batch = records[k * args.facts:(k + 1) * args.facts]
                tick = time.monotonic()
                status, body = call(server.port, "POST", "/v1/edits", {"requests": batch}, key=WRITE_KEY,
                                    timeout=3600)
                edits.append({"status": status, "seconds": round(time.monotonic() - tick, 1),
                              **({k2: body[k2] for k2 in ("id", "version", "efficacy", "timings")}
                                 if status == 200 else {"detail": body})})
                print(f"edit {k + 1}: {edits[-1]}", flush=True)
            phases["during"] = time.monotonic() - mark
            load.phase, mark = "after", time.monotonic()
            time.sleep(args.seconds)
            phases["after"] = time.monotonic() - mark
        finally:
            load.stop()
            sampling.set()
            server.stop()
    result = {
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "model": args.model, "clients": args.clients, "workers": args.workers, "max_tokens": args.max_tokens,
        "edits_of": args.facts, "startup_s": round(startup, 1), "peak_rss_mb": round(peak["mb"], 1),
        "phases": {name: summarise([r for r in load.records if r["phase"] == name], seconds)
                   for name, seconds in phases.items()},
        "edits": edits,
        "machine": describe_machine() + ", shared with other work",
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
