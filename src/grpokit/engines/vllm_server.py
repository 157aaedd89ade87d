"""`grpokit vllm-serve`: vLLM in its own process, serving rollouts and taking weight updates.

The server runs one `VLLMEngine` (vLLM in the server's process, as in colocate mode) behind a
small JSON-over-HTTP API (protocol "grpokit-vllm-server/1", docs/VLLM_SERVER.md):

    GET  /health              {"status": "ok" | "loading", "protocol", "instance", "group"}
    GET  /info                protocol, instance, model, max_model_len, dtype, device, version,
                              weights: {name: shape} (the HF checkpoint's names)
    POST /generate            token-id prompts + sampling parameters -> completion token ids and
                              the sampled tokens' log-probs
    POST /init_weight_group   join the trainer's two-member process group (gloo / NCCL)
    POST /update_weights      receive {names, shapes} over that group, reload vLLM's weights
    POST /close_weight_group  leave it

HTTP requests are answered by threads; everything that touches vLLM or the weight group runs
on the main thread. A generation request adds its prompts to vLLM's running batch and its thread
waits for them, so concurrent requests (a trainer's multi-turn rollouts send one per turn, and
several trainer processes share a server) are sampled together; a weight update waits until no
request is running. `instance` is a random id fixed for the server's life: a client that sees it
change knows the server restarted (and lost the pushed weights).

The server keeps a copy of every weight (in vLLM's dtype): a trainer sends only the tensors a
step changed, and each update reloads all of them into vLLM (a partial reload of a fused layer,
e.g. q_proj of qkv_proj, would be wrong).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from grpokit.engines.base import SamplingParams
from grpokit.engines.vllm_client import PROTOCOL
from grpokit.engines.vllm_engine import EngineBusy
from grpokit.engines.weight_sync import RECEIVER, WeightGroup, local_address_towards
from grpokit.errors import ConfigError

logger = logging.getLogger("grpokit")

_MAX_BODY_BYTES = 64 << 20  # a generation request of token ids is far smaller


class _Stop(Exception):
    """Raised by the signal handler to end the main loop."""


@dataclass
class _Job:
    """Engine work queued by an HTTP thread; `needs_idle`: run only when no request is running."""

    work: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    needs_idle: bool
    started: bool = False


class VLLMServer:
    """The HTTP front (threads) and the engine loop (main thread) of `grpokit vllm-serve`.

    The engine (a `VLLMEngine`) is used through `start` (add requests, futures back), `step`,
    `busy`, `load_weights` and `checkpoint_weights`.
    """

    def __init__(self, host: str, port: int, model_name: str) -> None:
        """Bind `host:port` (fails at once when the port is taken); nothing is served yet."""
        self.instance = uuid.uuid4().hex
        self.model_name = model_name
        self.engine: Any = None  # the VLLMEngine, once loaded
        self.weights: dict[str, torch.Tensor] = {}
        self.group: WeightGroup | None = None
        self.version = 0  # weight updates received
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self.address = f"http://{host}:{self.httpd.server_address[1]}"

    # ---- lifecycle --------------------------------------------------------------------------
    def start_http(self) -> None:
        """Answer HTTP from a background thread (`/health` says "loading" until `load`)."""
        threading.Thread(target=self.httpd.serve_forever, name="grpokit-http", daemon=True).start()

    def load(self, engine: Any) -> None:
        """Serve `engine` (a `VLLMEngine`) from now on."""
        self.weights = engine.checkpoint_weights()
        self.engine = engine

    def run(self) -> None:
        """Run queued engine work on this (main) thread until SIGINT/SIGTERM, then stop HTTP."""

        def stop(signum: int, frame: Any) -> None:
            raise _Stop

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            self.process_jobs(threading.Event())
        except _Stop:
            logger.info("grpokit vllm-serve: stopping.")
        finally:
            self.close()

    def process_jobs(self, stop: threading.Event) -> None:
        """Run queued engine work and vLLM's steps on this thread until `stop` is set.

        Jobs run in arrival order. A generation job only adds its requests, which then run with
        every other running request, one `step` per loop; a job that needs the engine idle (a
        weight update; a generation at another temperature, refused with `EngineBusy`) waits,
        and the jobs behind it with it, until the running requests have finished.
        """
        job: _Job | None = None
        while not stop.is_set():
            if job is None:
                job = self._next_job(wait=not self._busy())
            while job is not None and not (job.needs_idle and self._busy()):
                if not self._run(job):
                    job.needs_idle = True  # retried once the running requests have finished
                    break
                job = self._next_job(wait=False)
            if self._busy():
                try:
                    self.engine.step()
                except Exception:  # the running requests' futures carry the error to clients
                    logger.exception("grpokit vllm-serve: a vLLM step failed")

    def _busy(self) -> bool:
        return self.engine is not None and bool(self.engine.busy)

    def _next_job(self, *, wait: bool) -> _Job | None:
        try:
            return self.jobs.get(timeout=0.2) if wait else self.jobs.get_nowait()
        except queue.Empty:
            return None

    @staticmethod
    def _run(job: _Job) -> bool:
        """Run `job` into its future; False when the engine refused it for now (`EngineBusy`)."""
        if not job.started:
            job.started = True
            if not job.future.set_running_or_notify_cancel():
                return True
        try:
            result = job.work()
        except EngineBusy:
            return False
        except Exception as error:  # reported to the HTTP client
            job.future.set_exception(error)
        else:
            job.future.set_result(result)
        return True

    def close(self) -> None:
        """Stop answering HTTP and free the port."""
        self.httpd.shutdown()
        self.httpd.server_close()

    def on_main_thread(self, work: Callable[[], Any], *, needs_idle: bool = False) -> Any:
        """Run `work` on the engine loop (with `needs_idle`, when no request is running) and
        return its result (or raise its error)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.jobs.put(_Job(work, future, needs_idle))
        return future.result()

    # ---- endpoints --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        status = "ok" if self.engine is not None else "loading"
        group = None if self.group is None else self.group.prefix
        return {"status": status, "protocol": PROTOCOL, "instance": self.instance, "group": group}

    def info(self) -> dict[str, Any]:
        engine = self._ready()
        return {
            "protocol": PROTOCOL,
            "instance": self.instance,
            "model": self.model_name,
            "max_model_len": engine.max_model_len,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "version": self.version,
            "weights": {name: list(w.shape) for name, w in self.weights.items()},
        }

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._ready()
        prompt_ids = _int_lists(request.get("prompt_ids"), "prompt_ids")
        b, n = len(prompt_ids), int(request.get("n", 1))
        seed = request.get("seed")
        if isinstance(seed, list):
            seeds = _per_prompt(seed, b, "seed")
        else:  # prompt i's request seeds its n completions seed + i*n + g
            seeds = [None if seed is None else int(seed) + i * n for i in range(b)]
        sampling = SamplingParams(
            temperature=float(request.get("temperature", 1.0)),
            top_p=float(request.get("top_p", 1.0)),
            top_k=int(request.get("top_k", 0)),
            min_p=float(request.get("min_p", 0.0)),
            repetition_penalty=float(request.get("repetition_penalty", 1.0)),
            generation_kwargs=_from_json(dict(request.get("generation_kwargs") or {})),
        )
        stops = request.get("stop_token_ids")
        futures = self.on_main_thread(
            lambda: engine.start(
                prompt_ids,
                num_generations=n,
                max_tokens=_per_prompt(request.get("max_tokens", 16), b, "max_tokens"),
                min_tokens=_per_prompt(request.get("min_tokens") or 0, b, "min_tokens"),
                seeds=seeds,
                sampling=sampling,
                stop_token_ids=None if stops is None else [int(t) for t in stops],
            )
        )
        results = [future.result() for future in futures]  # sampled on the main thread
        logprobs = None
        if all(r.logprobs is not None for r in results):
            logprobs = [lp for r in results for lp in r.logprobs]
        return {
            "instance": self.instance,
            "completion_ids": [c for r in results for c in r.completions],
            "logprobs": logprobs,
            "cached_tokens": [r.cached_tokens for r in results],
        }

    def init_weight_group(self, request: dict[str, Any]) -> dict[str, Any]:
        self._ready()
        host, port = str(request["host"]), int(request["port"])
        backend = str(request.get("backend", "gloo"))
        timeout = float(request.get("timeout", 240.0))

        def join() -> None:
            self.group = None
            store = WeightGroup.connect_store(host, port, timeout)
            self.group = WeightGroup(
                store,
                prefix=str(request["prefix"]),
                rank=RECEIVER,
                backend=backend,
                address=local_address_towards(host, port),
                timeout=timeout,
            )

        self.on_main_thread(join, needs_idle=True)
        logger.info("grpokit vllm-serve: weight-update group with %s:%d (%s).", host, port, backend)
        return {"instance": self.instance}

    def update_weights(self, request: dict[str, Any]) -> dict[str, Any]:
        engine = self._ready()
        names = [str(n) for n in request["names"]]
        shapes = [[int(d) for d in shape] for shape in request["shapes"]]
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names but {len(shapes)} shapes.")

        def receive_and_load() -> int:
            if self.group is None or self.group.prefix != request.get("group"):
                raise ValueError(
                    "Not this server's current weight-update group (another trainer opened one "
                    "since, or none is open): POST /init_weight_group first."
                )
            start = time.perf_counter()
            try:
                tensors = self.group.receive(shapes, engine.dtype)  # drained even if refused
            except RuntimeError:
                self.group = None  # the sender is gone or the transfer broke
                raise
            problems = [
                n
                for n, s in zip(names, shapes, strict=True)
                if n not in self.weights or list(self.weights[n].shape) != s
            ]
            if problems:
                raise ValueError(
                    f"Weights not in this server's model or of another shape: {problems[:5]}"
                )
            received = time.perf_counter()
            for name, tensor in zip(names, tensors, strict=True):
                self.weights[name].copy_(tensor)
            engine.load_weights(self.weights.items())
            self.version += 1
            logger.info(
                "grpokit vllm-serve: weights updated (version %d, %d tensors): received in "
                "%.2f s, loaded into vLLM in %.2f s.",
                self.version,
                len(names),
                received - start,
                time.perf_counter() - received,
            )
            return self.version

        version = self.on_main_thread(receive_and_load, needs_idle=True)
        return {"instance": self.instance, "version": version}

    def close_weight_group(self, request: dict[str, Any]) -> dict[str, Any]:
        def close() -> None:
            self.group = None

        self.on_main_thread(close, needs_idle=True)
        return {"instance": self.instance}

    def _ready(self) -> Any:
        if self.engine is None:
            raise _NotReady(
                "The server is still loading its model; retry after GET /health says 'ok'."
            )
        return self.engine


class _NotReady(Exception):
    """A request that needs the engine arrived before it was loaded (HTTP 503)."""


def _int_lists(value: Any, field: str) -> list[list[int]]:
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise ValueError(f"{field} must be a list of token-id lists.")
    return [[int(t) for t in row] for row in value]


def _from_json(generation_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generation_kwargs` as vLLM takes them: JSON turned `logit_bias`'s token-id keys into
    strings."""
    bias = generation_kwargs.get("logit_bias")
    if isinstance(bias, dict):
        generation_kwargs["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
    return generation_kwargs


def _per_prompt(value: Any, count: int, field: str) -> list[Any]:
    """`value` for each of `count` prompts: a list of `count` ints (or nulls) as given, else
    the one int for all."""
    if not isinstance(value, list):
        return [int(value)] * count
    if len(value) != count:
        raise ValueError(f"{field} has {len(value)} values for {count} prompts.")
    return [None if v is None else int(v) for v in value]


def _handler(server: VLLMServer) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to `server`."""
    gets: dict[str, Callable[[], dict[str, Any]]] = {"/health": server.health, "/info": server.info}
    posts: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "/generate": server.generate,
        "/init_weight_group": server.init_weight_group,
        "/update_weights": server.update_weights,
        "/close_weight_group": server.close_weight_group,
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            route = gets.get(self.path)
            self._answer(None if route is None else lambda: route())

        def do_POST(self) -> None:
            route = posts.get(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            if length > _MAX_BODY_BYTES:
                self._send(413, {"error": f"request body over {_MAX_BODY_BYTES} bytes"})
                return
            body = self.rfile.read(length)
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                self._send(400, {"error": "the request body is not JSON"})
                return
            self._answer(None if route is None else lambda: route(request))

        def _answer(self, call: Callable[[], dict[str, Any]] | None) -> None:
            if call is None:
                self._send(404, {"error": f"no endpoint {self.command} {self.path}"})
                return
            try:
                self._send(200, call())
            except _NotReady as error:
                self._send(503, {"error": str(error)})
            except (ValueError, TypeError, KeyError) as error:
                self._send(400, {"error": f"{type(error).__name__}: {error}"})
            except Exception as error:  # the server keeps serving; the client sees the error
                logger.exception("grpokit vllm-serve: %s %s failed", self.command, self.path)
                self._send(500, {"error": f"{type(error).__name__}: {error}"})

        def _send(self, status: int, reply: dict[str, Any]) -> None:
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("grpokit vllm-serve: " + format, *args)

    return Handler


# ---- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `grpokit vllm-serve`."""
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face id or path, a .gguf file, "
        "or a built-in name (as the training run's `model`)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: "
        "every interface, for trainers on other machines; no authentication)",
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0 = any free port)")
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + completion in tokens (default: the model's max_position_embeddings)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=None,
        help="KV-cache size (default on a CPU: 1 GiB; on a GPU: sized by --gpu-memory-utilization)",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument(
        "--no-enforce-eager",
        dest="enforce_eager",
        action="store_false",
        help="let vLLM compile the model (slow first start)",
    )
    parser.add_argument("--seed", type=int, default=0, help="vLLM's seed")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's default)"
    )


def serve(args: argparse.Namespace) -> None:
    """Run `grpokit vllm-serve` until SIGINT/SIGTERM.

    Raises:
        ImportError: vLLM is not installed.
        ConfigError: the port is taken, or the model cannot be loaded.
    """
    from grpokit.engines.models import load_causal_lm
    from grpokit.engines.vllm_engine import VLLMEngine, _import_vllm

    _import_vllm()  # a clear ImportError before anything else when vLLM is missing
    try:
        server = VLLMServer(args.host, args.port, args.model)
    except OSError as error:
        raise ConfigError(
            f"vllm-serve: cannot listen on {args.host}:{args.port} ({error}); choose another "
            "--port or stop the process that holds it."
        ) from error
    server.start_http()
    logger.info("grpokit vllm-serve: loading %s (HTTP on %s).", args.model, server.address)
    try:
        model, tokenizer = load_causal_lm(args.model)
    except OSError as error:  # a missing folder or file, an id not in the local cache
        raise ConfigError(f"vllm-serve --model {args.model!r}: {error}") from error
    length = args.max_model_len or int(model.config.max_position_embeddings)
    threads = args.threads or torch.get_num_threads()  # vLLM lowers it to 1 while building
    on_gpu = torch.cuda.is_available()
    kv_bytes = args.kv_cache_memory_bytes or (None if on_gpu else 1 << 30)
    extra = {"gpu_memory_utilization": args.gpu_memory_utilization} if on_gpu else {}
    engine = VLLMEngine(
        model,
        tokenizer,
        max_model_len=length,
        dtype=args.dtype,
        enforce_eager=args.enforce_eager,
        kv_cache_memory_bytes=kv_bytes,
        seed=args.seed,
        **extra,
    )
    del model
    torch.set_num_threads(threads)
    server.load(engine)
    logger.info(
        "grpokit vllm-serve: serving %s on %s (protocol %s, max_model_len %d).",
        args.model,
        server.address,
        PROTOCOL,
        length,
    )
    print(f"grpokit vllm-serve: ready on {server.address}", flush=True)
    server.run()
