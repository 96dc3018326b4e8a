"""A custom reward for selfplay in plain Python.

This is a gRPC server for the `selfplay.v1.Reward` service of proto/selfplay/v1/reward.proto.
Actors started with `reward.kind = "remote"` and `reward.address = "http://HOST:PORT"` send it
batches of (query, answer) pairs, and it replies with one finite score per pair. The score
comes from `score()` below, a plain Python function: replace it with your own (a format check,
a unit test run, a call to another model...).

    python examples/python-reward/server.py --listen 127.0.0.1:50053

Needs grpcio and grpcio-tools (scripts/requirements.txt; scripts/setup.sh installs them in the
venv). The Python code for reward.proto is generated at start into a temporary directory, so
nothing generated is kept in the repository.

Authentication: selfplay's actors send `authorization: Bearer <token>` with every call. When
SELFPLAY_TOKEN (or --token-file) is set, the server refuses any call without that token, as
selfplay's own servers do. Without a token it serves anyone: bind it to 127.0.0.1 then.
"""
import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_tools import protoc

MAX_PAIRS = 256  # per request, as selfplay's reward-server
MAX_TEXT_BYTES = 256 * 1024  # per query or answer


def score(query: str, answer: str) -> float:
    """The reward of one answer to one query. Edit this function.

    The example pays for concise answers: 1.0 for an answer of at most 12 words, then 0.1 less
    for every word beyond, down to 0. Any finite float works: selfplay multiplies it by
    reward.scale and uses it as R (the solver's reward; the challenger's is -mean R).
    """
    words = len(answer.split())
    return max(0.0, 1.0 - 0.1 * max(0, words - 12))


def load_proto(proto_dir: Path):
    """Compiles reward.proto into a temporary directory and imports the generated modules."""
    out = tempfile.mkdtemp(prefix="selfplay-reward-proto-")
    rel = "selfplay/v1/reward.proto"
    if not (proto_dir / rel).is_file():
        sys.exit(f"{proto_dir / rel} not found: pass --proto-dir (the repository's proto/ folder)")
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", rel]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {proto_dir / rel}")
    sys.path.insert(0, out)
    try:
        from selfplay.v1 import reward_pb2, reward_pb2_grpc  # noqa: E402 (generated just now)
    finally:
        # Imported modules live on in memory: the generated files are no longer needed.
        sys.path.remove(out)
        shutil.rmtree(out, ignore_errors=True)
    return reward_pb2, reward_pb2_grpc


class BearerAuth(grpc.ServerInterceptor):
    """Refuses calls whose `authorization` metadata is not `Bearer <token>`."""

    def __init__(self, token: str):
        self.want = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self.deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        got = dict(details.invocation_metadata).get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() == "bearer" and token == self.want:
            return continuation(details)
        return self.deny


def make_servicer(reward_pb2, reward_pb2_grpc, counter):
    class Reward(reward_pb2_grpc.RewardServicer):
        def Score(self, request, context):
            pairs = list(request.pairs)
            if len(pairs) > MAX_PAIRS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(pairs)} pairs, at most {MAX_PAIRS}")
            scores = []
            for i, p in enumerate(pairs):
                if len(p.query.encode()) > MAX_TEXT_BYTES or len(p.answer.encode()) > MAX_TEXT_BYTES:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"pairs[{i}] is over {MAX_TEXT_BYTES} bytes")
                try:
                    s = float(score(p.query, p.answer))
                except Exception as e:  # a bug in score(): fail this request, keep serving
                    context.abort(grpc.StatusCode.INTERNAL, f"score() failed on pairs[{i}]: {e!r}")
                if not math.isfinite(s):
                    context.abort(grpc.StatusCode.INTERNAL, f"score() returned {s} for pairs[{i}]")
                scores.append(s)
            with counter["lock"]:
                counter["pairs"] += len(pairs)
                total = counter["pairs"]
            print(f"scored {len(pairs)} pairs (total {total})", file=sys.stderr, flush=True)
            return reward_pb2.ScoreResponse(scores=scores)

    return Reward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default=os.environ.get("SELFPLAY_LISTEN", "127.0.0.1:50053"),
                    help="address to serve on (port 0: the system picks one; the ready file says which)")
    ap.add_argument("--ready-file", help="write {\"grpc\": ADDRESS} here once serving")
    ap.add_argument("--token-file", default=os.environ.get("SELFPLAY_TOKEN_FILE"),
                    help="file holding the bearer token (else SELFPLAY_TOKEN; neither: no authentication)")
    ap.add_argument("--proto-dir", default=str(Path(__file__).resolve().parents[2] / "proto"),
                    help="folder holding selfplay/v1/reward.proto (default: the repository's proto/)")
    args = ap.parse_args()

    token = os.environ.get("SELFPLAY_TOKEN", "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    reward_pb2, reward_pb2_grpc = load_proto(Path(args.proto_dir))
    interceptors = [BearerAuth(token)] if token else []
    if not token:
        print("no token: serving without authentication", file=sys.stderr, flush=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    counter = {"pairs": 0, "lock": threading.Lock()}
    reward_pb2_grpc.add_RewardServicer_to_server(make_servicer(reward_pb2, reward_pb2_grpc, counter), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit(f"cannot listen on {args.listen}")
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    address = f"{host}:{port}"
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        Path(tmp).write_text(json.dumps({"grpc": address}))
        os.replace(tmp, args.ready_file)
    print(f"python reward server serving on {address}", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
