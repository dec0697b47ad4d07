"""`mllm serve`: load a model, bind a socket (127.0.0.1 unless told otherwise), run uvicorn.

The socket is bound here, before uvicorn starts, so `--port 0` (any free port) works and the line
printed at start names the port really bound: scripts and tests read it instead of guessing a port
that another process may take first.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import uvicorn

from mllm.loading import resolve_model_dir
from mllm.model import MultimodalLM
from mllm.serving.app import ServeSettings, create_app

DEFAULT_HOST = "127.0.0.1"  # local only: a model server on every interface is an operator's choice


def load_for_serving(model_dir: str | Path, device: str = "auto", dtype: str = "fp32") -> MultimodalLM:
    path = resolve_model_dir(model_dir)
    model = MultimodalLM.from_pretrained(path, torch_dtype=torch.bfloat16 if dtype == "bf16" else None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(torch.device(device)).eval()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(128)
    return sock


def serve(model: MultimodalLM, settings: ServeSettings, host: str = DEFAULT_HOST, port: int = 8000) -> None:
    """Serve until interrupted. Prints `serving NAME at http://HOST:PORT` once the socket is bound."""
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {settings.model_name!r} at http://{shown}:{bound} "
        f"(OpenAI API: http://{shown}:{bound}/v1, chat page: http://{shown}:{bound}/)",
        flush=True,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"note: listening on {host}, reachable from other machines; there is no authentication",
            file=sys.stderr,
        )
    config = uvicorn.Config(create_app(model, settings), log_level="warning", access_log=False, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
