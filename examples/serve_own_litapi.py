"""Live edits in your own LitServe server: your LitAPI follows the edit history between request batches.

Run it (it serves until Ctrl-C):

    KEDIT_WRITE_KEY=w KEDIT_READ_KEY=r python examples/serve_own_litapi.py --port 8000 --history edits/

then score an answer, edit the fact, and score again:

    curl -s localhost:8000/v1/score -H "Authorization: Bearer r" \\
        -d '{"prompt": "Toko Yasuda plays the", "answer": " piano"}'
    curl -s localhost:8000/v1/edits -H "Authorization: Bearer w" \\
        -d '{"requests": [{"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}]}'
"""

from __future__ import annotations

import argparse
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Header, HTTPException

from lightning_kedit.serving import EditAPI, HistoryStore, ServeKeys, WeightsFollower, add_history_routes


class ScoreAPI(ls.LitAPI):
    """Your endpoint: the log-probability of an answer. Three lines make it serve the edited weights."""

    def __init__(self, model: str, history: str, keys: ServeKeys) -> None:
        super().__init__(api_path="/v1/score")
        self.model_spec, self.history, self.keys = model, history, keys

    def authorize(self, authorization: Annotated[str | None, Header()] = None) -> None:
        """Reading takes the read (or write) key."""
        code = self.keys.status(authorization, write=False)
        if code is not None:
            raise HTTPException(code, "give the read key as 'Authorization: Bearer KEY'")

    def setup(self, device: str) -> None:
        from lightning_kedit.models.loading import load_model

        self.model, self.tokenizer = load_model(self.model_spec)
        self.follower = WeightsFollower(self.model, HistoryStore(self.history))  # 1: follow the history

    def predict(self, request: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        version = self.follower.sync()  # 2: between batches, bring the weights to the committed version
        from lightning_kedit.evaluation.scoring import answer_log_probs

        with torch.no_grad():
            log_prob, _ = answer_log_probs(self.model, self.tokenizer, [request["prompt"]], [request["answer"]])
        return {"log_prob": float(log_prob[0]), "kedit_version": version}  # 3: say which version answered


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--history", default="edits")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    keys = ServeKeys.load()  # KEDIT_READ_KEY / KEDIT_WRITE_KEY
    score = ScoreAPI(args.model, args.history, keys)
    edits = EditAPI(args.model, args.history, keys)  # POST /v1/edits: computes, commits, answers
    server = ls.LitServer([score, edits], accelerator="cpu")
    edits.request_timeout = -1  # edits may queue behind a long edit
    add_history_routes(server.app, HistoryStore(args.history), keys)  # GET/DELETE /v1/edits, revert
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False)


if __name__ == "__main__":
    main()
