"""``kedit serve``: serve a model over HTTP (OpenAI completions) and edit it live, with reverts and a history.

Keys come from ``KEDIT_READ_KEY`` / ``KEDIT_WRITE_KEY`` (or ``--keys FILE``); see ``docs/serving.md``.

Example:
    $ export KEDIT_WRITE_KEY=... KEDIT_READ_KEY=...
    $ kedit serve --port 8000 --history edits/ --workers 2
    $ curl -s localhost:8000/v1/completions -H "Authorization: Bearer $KEDIT_READ_KEY" \\
        -d '{"prompt": "The Eiffel Tower is in", "max_tokens": 5, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lightning_kedit.cli.hparam_options import add_hparam_arguments, given_hparams
from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit serve``."""
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--history", required=True, metavar="DIR",
                        help="the edit history folder (created when missing; a restart resumes it)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="generation worker processes")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1", "0.0.0.0", "::"),
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--keys", default=None, metavar="FILE",
                        help="a file of KEDIT_READ_KEY=... and KEDIT_WRITE_KEY=... lines (default: the environment)")
    parser.add_argument("--method", choices=("memit", "rome"), default="memit", help="edit method (default: memit)")
    parser.add_argument("--stats", default=None, metavar="FILE",
                        help="key statistics file (kedit stats --out); default: cached, from the bundled corpus")
    add_hparam_arguments(parser)
    parser.add_argument("--max-ppl-rise", type=float, default=0.10, metavar="R",
                        help="damage guard: largest relative perplexity rise on its probe (default: 0.10 = +10%%)")
    parser.add_argument("--max-neighborhood-drop", type=float, default=0.10, metavar="D",
                        help="damage guard: largest fall of the neighbourhood probability (default: 0.10)")
    parser.add_argument("--traffic-stats", action="store_true",
                        help="merge the key statistics of the served prompts into each edit's statistics")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch threads per generation worker (default: the cores shared out)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="B", help="generation requests per batch")
    parser.add_argument("--api-servers", type=int, default=1, metavar="N", help="HTTP server processes (default: 1)")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="shut down gracefully after this many seconds (tests, benchmarks)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Check the options, then serve until interrupted (or ``--stop-after``)."""
    from lightning_kedit.serving import ServeKeys, build_server

    if not 1024 <= args.port <= 65535:
        raise KeditError(f"--port {args.port}: give a port from 1024 to 65535")
    for name in ("workers", "max_batch_size", "api_servers"):
        if getattr(args, name) < 1:
            raise KeditError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise KeditError(f"--threads must be >= 1, got {args.threads}")
    if args.stats is not None and not Path(args.stats).is_file():
        raise KeditError(f"--stats {args.stats!r} is not a file; make one with `kedit stats --out FILE`")
    keys = ServeKeys.load(args.keys)
    hparams = given_hparams(args)
    server = build_server(args.model, args.history, keys, workers=args.workers, method=args.method,
                          statistics=args.stats, traffic_statistics=args.traffic_stats, threads=args.threads,
                          max_batch_size=args.max_batch_size, hparams=hparams, max_ppl_rise=args.max_ppl_rise,
                          max_neighborhood_drop=args.max_neighborhood_drop)
    # LitServe shuts down gracefully on a KeyboardInterrupt in its main process: SIGTERM gets the same
    # (a process started in the background may have SIGINT ignored).
    signal.signal(signal.SIGTERM, _interrupt)
    if args.stop_after is not None:
        timer = threading.Timer(args.stop_after, os.kill, (os.getpid(), signal.SIGTERM))
        timer.daemon = True
        timer.start()
    print(f"kedit serve: {args.model} on http://{args.host}:{args.port} (history {args.history}, "
          f"{args.workers} generation worker(s))", flush=True)
    server.run(host=args.host, port=args.port, num_api_servers=args.api_servers, log_level=args.log_level,
               generate_client_file=False)
    return None


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM: a KeyboardInterrupt in the main process; the default action in the HTTP processes it forks."""
    if os.getpid() == _MAIN_PID:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


_MAIN_PID = os.getpid()
