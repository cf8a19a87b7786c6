"""`mlx-serving-pyworker`: an mlx-serving worker built on mlx-lm, serving the worker protocol
on stdin/stdout. stdout carries the protocol only (anything else a library prints goes to
stderr, with the logs). The worker exits with status 0 when stdin ends or after `shutdown`."""

import argparse
import ctypes
import logging
import os
import signal
import sys
import threading

# No model hub here: model directories are local. Quiet libraries that print progress.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import PROTOCOL_VERSION, __version__  # noqa: E402

DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
# How long the last final events may take to go out once stdin has ended.
EOF_GRACE_S = 0.5


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in 1..")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mlx-serving-pyworker", description="An mlx-serving worker built on mlx-lm: JSON-RPC 2.0 over stdin/stdout"
    )
    p.add_argument("--model", help="load this model directory at start-up (more can be loaded with `load_model`)")
    p.add_argument("--model-name", help="name of the --model for requests; the directory name when absent")
    p.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto",
                   help="the GPU where MLX has one (Metal, CUDA), else the CPU")
    p.add_argument("--heartbeat-ms", type=positive, default=1000, help="milliseconds between heartbeat notifications")
    p.add_argument("--max-sequences", type=positive, default=32, help="sequences decoded together at most")
    p.add_argument("--max-queue", type=non_negative, default=256,
                   help="requests waiting for admission at most; more are refused as overloaded")
    p.add_argument("--kv-cache-bytes", type=non_negative, default=2 << 30,
                   help="bytes of KV cache the running sequences may reserve together (prompt + max_tokens each)")
    p.add_argument("--prefill-chunk", type=positive, default=512, help="prompt tokens per prefill chunk")
    p.add_argument("--prefill-chunk-idle", type=positive, default=2048,
                   help="accepted for the Rust worker's flag set; mlx-lm's generator prefills --prefill-chunk "
                        "tokens per step whether or not streams decode, so this changes nothing here")
    p.add_argument("--prefill-stall-ms", type=non_negative, default=50,
                   help="accepted for the Rust worker's flag set (whose chunks grow to what the model prefills "
                        "in this time while streams decode); here every step takes --prefill-chunk")
    p.add_argument("--warm-up", choices=("auto", "always", "never"), default="auto",
                   help="accepted for the Rust worker's flag set (which warms a model up as it loads it, so "
                        "that MLX's CUDA backend compiles its kernels first); this changes nothing here")
    p.add_argument("--max-line-bytes", type=non_negative, default=DEFAULT_MAX_LINE_BYTES,
                   help="longest accepted input line in bytes; longer lines get an error response")
    p.add_argument("--max-context-tokens", type=non_negative, default=0,
                   help="context of every model in tokens (prompt plus max_tokens) when below the model's own; "
                        "0 keeps each model's own")
    p.add_argument("--prefix-cache-bytes", type=non_negative, default=0,
                   help="accepted for the Rust worker's flag set; this worker keeps no prefix cache, so it "
                        "reports 0 bytes whatever is given")
    p.add_argument("--version", action="version", version=f"mlx-serving-pyworker {__version__}")
    args = p.parse_args(argv)
    if args.model_name is not None and args.model is None:
        p.error("--model-name requires --model")
    return args


def exit_with_parent() -> None:
    """On Linux the kernel also kills the worker when its parent dies (stdin EOF covers every OS)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
            logging.warning("PR_SET_PDEATHSIG failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logging.warning("PR_SET_PDEATHSIG is not available: %s", e)
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def protocol_stdout() -> int:
    """Keeps the real stdout for the protocol and points fd 1 (and `sys.stdout`) at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return fd


def main(argv=None) -> None:
    level = os.environ.get("MLX_SERVING_LOG", "info").upper()
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    exit_with_parent()
    out_fd = protocol_stdout()

    import mlx.core as mx

    from .engine import Engine, Limits, Shared
    from .errors import RpcError
    from .server import Output, Server, start_heartbeat

    if args.device == "cpu" or (args.device == "auto" and not mx.is_available(mx.gpu)):
        device = "cpu"
    else:
        device = "gpu"
    try:
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    except ValueError as e:
        logging.error("cannot use the %s device: %s", device, e)
        os._exit(1)

    limits = Limits(
        max_sequences=args.max_sequences,
        max_queue=args.max_queue,
        kv_cache_bytes=args.kv_cache_bytes,
        max_line_bytes=args.max_line_bytes,
        prefill_chunk=args.prefill_chunk,
    )
    shared = Shared()
    engine = Engine(limits, shared, max_context_tokens=args.max_context_tokens)
    engine.start()
    out = Output(out_fd)

    if args.model:
        name = args.model_name or os.path.basename(os.path.normpath(args.model)) or "model"
        loaded = threading.Event()
        failure = []

        def done(result, error: RpcError):
            if error is not None:
                failure.append(error.message)
            loaded.set()

        engine.submit("load_model", done, model=name, path=args.model)
        loaded.wait()
        if failure:
            logging.error("loading --model: %s", failure[0])
            os._exit(1)

    handshake = {
        "protocol_version": PROTOCOL_VERSION,
        "engine": f"mlx-serving-pyworker {__version__} (mlx {mx.__version__}, mlx-lm {_mlx_lm_version()})",
        "device": device,
        "pid": os.getpid(),
        "capabilities": ["generate", "cancel", "logprobs", "chat", "token_ids", "continuous_batching"],
        "limits": limits.to_json(),
    }

    def exit_when_stopped():
        engine.stopped.wait()
        logging.info("shutdown complete")
        os._exit(0)

    threading.Thread(target=exit_when_stopped, name="exit", daemon=True).start()
    start_heartbeat(shared, out, args.heartbeat_ms / 1000.0)
    Server(engine, out, handshake).serve(0, args.max_line_bytes)

    logging.info("stdin closed: cancelling everything and exiting")
    engine.submit("shutdown", lambda result, error: None, deadline_ms=0)
    engine.stopped.wait(EOF_GRACE_S)
    os._exit(0)


def _mlx_lm_version() -> str:
    from mlx_lm import __version__ as version

    return version
