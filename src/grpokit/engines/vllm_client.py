"""Rollouts from a vLLM server in another process or on another machine (TRL's
`vllm_mode="server"`).

`VLLMServerEngine` implements `GenerationEngine` against a `grpokit vllm-serve` server
(`engines.vllm_server`): prompts go out as token ids over HTTP, completions and their
log-probs come back, and after each optimizer step the trainer pushes the weights a step can
change into the server over a separate two-member process group (`engines.weight_sync`). This
module does not need vLLM; only the server does.

The protocol ("grpokit-vllm-server/1", JSON over HTTP) is grpokit's own, documented in
docs/VLLM_SERVER.md; it is not that of `trl vllm-serve` / `vllm serve`.
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from grpokit.engines.base import (
    GenerationOutput,
    SamplingParams,
    TurnHandler,
    completions_output,
    eos_token_ids,
)
from grpokit.engines.multi_turn import (
    Sampled,
    TurnRequest,
    TurnStats,
    overlapped_turns,
    wait_for_any,
)
from grpokit.engines.weight_sync import (
    SENDER,
    OutgoingWeights,
    WeightGroup,
    local_address_towards,
    merged_weights,
    refuse_prompt_learning,
    sharded_parameter,
)
from grpokit.errors import UserError

logger = logging.getLogger("grpokit")

PROTOCOL = "grpokit-vllm-server/1"
START_HINT = "`grpokit vllm-serve --model <model> --host <host> --port <port>`"
_POLL_SECONDS = 1.0  # between health checks while waiting for the server
_NOTICE_SECONDS = 15.0  # between "still waiting" messages
_MAX_TURN_REQUESTS = 16  # generation requests one multi-turn call keeps in flight


class VLLMServerError(UserError, ConnectionError):
    """The vLLM server cannot be reached, did not reply in time, went away or replied nonsense.

    Attributes:
        kind: "unreachable" (no connection, or it broke), "timeout", "http" (an error status,
            in `status`) or "malformed".
        status: The HTTP status of an "http" error, else None.
    """

    def __init__(self, message: str, kind: str = "http", status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


def server_url(base_url: str | None, host: str, port: int) -> str:
    """The server's base URL: `base_url` when given (trailing "/" dropped), else
    `http://host:port` (an IPv6 host in brackets)."""
    if base_url:
        return base_url.rstrip("/")
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


class ServerConnection:
    """JSON requests to one server, each with a timeout; every failure is a `VLLMServerError`
    (a 400 reply, the server refusing a request as invalid, is a `ValueError`)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.answered = False  # True once the server replied: later failures mean it went away
        # No proxy: a trainer's http_proxy must not route requests to its own server.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, *, what: str, timeout: float | None = None) -> dict[str, Any]:
        return self._request("GET", path, None, what=what, timeout=timeout)

    def post(self, path: str, payload: dict[str, Any], *, what: str) -> dict[str, Any]:
        return self._request("POST", path, payload, what=what, timeout=None)

    def _request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        *,
        what: str,
        timeout: float | None,
    ) -> dict[str, Any]:
        timeout = self.timeout if timeout is None else timeout
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            message = _error_message(error)
            if error.code == 400:
                raise ValueError(
                    f"The vLLM server at {self.url} refused {what}: {message}"
                ) from None
            raise VLLMServerError(
                f"The vLLM server at {self.url} failed {what} (HTTP {error.code}): {message}",
                status=error.code,
            ) from None
        except TimeoutError as error:
            raise self._timeout(what, timeout) from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, TimeoutError):
                raise self._timeout(what, timeout) from error
            raise self._unreachable(what, error.reason) from error
        except (http.client.HTTPException, ConnectionError, OSError) as error:
            raise self._unreachable(what, error) from error
        self.answered = True
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise self.malformed(path, f"not a JSON object: {body[:80]!r}")
        return reply

    def _timeout(self, what: str, timeout: float) -> VLLMServerError:
        return VLLMServerError(
            f"The vLLM server at {self.url} did not reply to {what} within {timeout:g} s. If it "
            "is only slow (a large batch on a CPU), raise vllm_server_timeout; otherwise check "
            "the server's log.",
            kind="timeout",
        )

    def _unreachable(self, what: str, reason: object) -> VLLMServerError:
        if self.answered:
            return VLLMServerError(
                f"The vLLM server at {self.url} went away during {what} ({reason}). Restart it "
                f"({START_HINT}) and resume the run from its last checkpoint (--resume).",
                kind="unreachable",
            )
        return VLLMServerError(
            f"No vLLM server answers at {self.url} ({reason}). Start one with {START_HINT} "
            "(see docs/VLLM_SERVER.md), or set vllm_server_base_url (or vllm_server_host and "
            "vllm_server_port) to a running server's address.",
            kind="unreachable",
        )

    def malformed(self, path: str, detail: str) -> VLLMServerError:
        return VLLMServerError(
            f"The server at {self.url} sent a malformed reply to {path} ({detail}). grpokit "
            f"expects a `grpokit vllm-serve` server (protocol {PROTOCOL}); `trl vllm-serve` and "
            "`vllm serve` speak other protocols.",
            kind="malformed",
        )


def _error_message(error: urllib.error.HTTPError) -> str:
    """The `error` field of a JSON error reply, else the start of the body."""
    try:
        body = error.read()
    except OSError:
        return error.reason if isinstance(error.reason, str) else str(error)
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace") or str(error.reason)


def wait_for_server(connection: ServerConnection, timeout: float) -> dict[str, Any]:
    """Poll `GET /health` until the server is ready (at most `timeout` seconds), then return
    `GET /info`.

    Raises:
        VLLMServerError: no ready server within `timeout`, or it speaks another protocol.
    """
    deadline = time.monotonic() + timeout
    next_notice = time.monotonic() + _NOTICE_SECONDS
    logger.info("Waiting up to %g s for the vLLM server at %s.", timeout, connection.url)
    while True:
        remaining = deadline - time.monotonic()
        try:
            health = connection.get(
                "/health", what="a health check", timeout=max(0.1, min(10.0, remaining))
            )
        except VLLMServerError as error:
            went_away = connection.answered and error.kind == "unreachable"
            if went_away or error.kind not in ("unreachable", "timeout"):
                raise
            last = str(error)
        else:
            if health.get("status") == "ok":
                break
            last = f"The vLLM server at {connection.url} is still loading its model."
        if time.monotonic() >= deadline:
            raise VLLMServerError(
                f"{last} Gave up after {timeout:g} s (vllm_server_timeout); a server that is "
                "still loading its model needs a larger vllm_server_timeout.",
                kind="timeout" if connection.answered else "unreachable",
            )
        if time.monotonic() >= next_notice:
            logger.info("Still waiting for the vLLM server at %s: %s", connection.url, last)
            next_notice += _NOTICE_SECONDS
        time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    info = connection.get("/info", what="the server description")
    if info.get("protocol") != PROTOCOL:
        raise connection.malformed("/info", f"protocol {info.get('protocol')!r}")
    for key in ("instance", "max_model_len", "dtype", "device", "weights"):
        if key not in info:
            raise connection.malformed("/info", f"no {key!r}")
    return info


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _sharded(model: Any) -> bool:
    """Whether `model`'s parameters are FSDP2 shards (`DTensor`s, gathered by `full_tensor`)
    or DeepSpeed ZeRO-3 parameters (gathered from their partitions): a push is then a
    collective of every process."""
    return any(sharded_parameter(p) for p in model.parameters())


def _agreed(decide: Callable[[], Any] | None) -> Any:
    """What `decide()` returns on process 0, on every process of the default group (`decide`
    is None elsewhere): broadcast from process 0, with its error if it raised, which every
    process then raises (process 0 its own)."""
    verdict: list[Any] = [None, None]  # [value, error message]
    error: BaseException | None = None
    if decide is not None:
        try:
            verdict[0] = decide()
        except Exception as raised:  # relayed to the other processes, then raised
            error, verdict[1] = raised, f"{type(raised).__name__}: {raised}"
    torch.distributed.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[1] is not None:
        raise VLLMServerError(f"Process 0's weight update failed: {verdict[1]}")
    return verdict[0]


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class VLLMServerEngine:
    """Samples with a `grpokit vllm-serve` server and keeps its weights equal to the policy's.

    At construction the engine waits for the server (`timeout` seconds), opens the weight-update
    group and pushes every weight of `model`, so the server samples from exactly the policy
    (e.g. one resumed from a checkpoint) whatever it loaded at start. Each `update_weights` then
    pushes only the weights a step can change (`merged_weights(changed_only=True)`: trainable
    parameters; under PEFT the merged base weights of adapted layers); the server keeps the rest.

    Weights go over gloo (CPU tensors), or NCCL when the server and `model` are both on CUDA
    devices. In a multi-process run only process 0 pushes (under FSDP2 and DeepSpeed ZeRO-3
    every process gathers each tensor with it, `_push_shards`); every process then waits at a
    barrier of the default process group, so no process samples before the server holds the
    new weights. Log-probs and temperature are as in `VLLMEngine` (the server runs one).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_url: str,
        timeout: float = 240.0,
        group_port: int = 51216,
    ) -> None:
        """Connect to the server at `base_url` and push `model`'s weights.

        Args:
            model: The policy (a transformers causal LM, optionally PEFT-wrapped).
            tokenizer: Its tokenizer (EOS and pad ids).
            base_url: The server's URL, e.g. "http://127.0.0.1:8000".
            timeout: Seconds to wait for the server at start, and for any one reply.
            group_port: Port of this process's rendezvous store for the weight-update group
                (0 = any free port).

        Raises:
            VLLMServerError: no server answers within `timeout`, or it serves a model whose
                weights do not match `model`'s names and shapes.
            ValueError: `model` has a prompt-learning adapter (`refuse_prompt_learning`).
        """
        refuse_prompt_learning(model)  # on every process, before any waits for another
        self.connection = ServerConnection(base_url, timeout)
        self.url, self.timeout, self.group_port = base_url, timeout, group_port
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(self.eos_token_ids[0] if pad is None else pad)
        info = wait_for_server(self.connection, timeout)
        self.instance: str = info["instance"]
        self.max_model_len = int(info["max_model_len"])
        self.dtype: torch.dtype = getattr(torch, str(info["dtype"]))
        self.server_device = str(info["device"])
        self.shapes = {name: list(shape) for name, shape in info["weights"].items()}
        self.group: WeightGroup | None = None
        self.last_turn_stats: TurnStats | None = None  # of the last `generate_turns`
        if _is_main_process():
            self._push(model, changed_only=False)
        _barrier()

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions for each prompt (unpadded token-id lists).

        `sampling.generation_kwargs` may hold `seed`, `min_new_tokens` and other
        `vllm.SamplingParams` fields, as for `VLLMEngine`; the server refuses unknown ones.

        Returns:
            As `VLLMEngine.generate`: `N = B*G` rows, prompts `[N, P]` left-padded (mask 1 =
            real token), `completion_ids`/`completion_mask` `[N, T]` (mask 1 up to and including
            the first EOS), `is_truncated` `[N]`, `sampling_logprobs` `[N, T]` or None.

        Raises:
            ValueError: a prompt plus `max_new_tokens` exceeds the server's `max_model_len`, or
                the server refused the request (e.g. an unknown `generation_kwargs` key).
            VLLMServerError: the server did not reply within the timeout, went away, restarted,
                or replied nonsense.
        """
        self._check_lengths(prompt_ids, max_new_tokens)
        extra = dict(sampling.generation_kwargs)
        seed, min_new_tokens = extra.pop("seed", None), int(extra.pop("min_new_tokens", None) or 0)
        payload = self._payload(
            prompt_ids,
            num_generations,
            sampling,
            extra,
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            seed=seed,
        )
        reply = self._post_generate(payload)
        completions, logprobs = reply.get("completion_ids"), reply.get("logprobs")
        try:
            return completions_output(
                prompt_ids,
                completions,  # type: ignore[arg-type]
                logprobs,
                num_generations=num_generations,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
            )
        except (ValueError, TypeError) as error:
            raise self.connection.malformed("/generate", str(error)) from None

    def generate_turns(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
        turns: TurnHandler,
    ) -> GenerationOutput:
        """Multi-turn rollouts (`engines.multi_turn.overlapped_turns`), the turn loop in this
        process (where the tools run): each model turn is one `POST /generate` continuing the
        row's conversation so far (`n` 1, the row's budget left as `max_tokens`), sent as soon
        as the row's tool reply is ready, while earlier requests are still running; the server
        samples concurrent requests together and serves the history from vLLM's prefix cache.
        Sampling fields as `VLLMEngine.generate_turns`; the later turns' prefill work is kept
        in `last_turn_stats`.

        Returns:
            A `GenerationOutput` with `tool_mask` (1 = sampled by the model) and
            `sampling_logprobs` (0 at appended tokens; None as in `generate`).

        Raises:
            ValueError: a prompt plus `max_new_tokens` exceeds the server's `max_model_len`, or
                the server refused a request.
            VLLMServerError: as for `generate`.
        """
        self._check_lengths(prompt_ids, max_new_tokens)
        extra = dict(sampling.generation_kwargs)
        seed, min_new_tokens = extra.pop("seed", None), int(extra.pop("min_new_tokens", None) or 0)
        workers = max(1, min(_MAX_TURN_REQUESTS, len(prompt_ids) * num_generations))
        with ThreadPoolExecutor(workers, thread_name_prefix="grpokit-turns") as pool:
            sampler = _ServerTurns(self, sampling, extra, pool)
            output, self.last_turn_stats = overlapped_turns(
                sampler,
                prompt_ids,
                num_generations=num_generations,
                max_new_tokens=max_new_tokens,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self.pad_token_id,
                turns=turns,
                min_new_tokens=min_new_tokens,
                seed=seed,
            )
        return output

    def _check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        longest = max((len(p) for p in prompt_ids), default=0)
        if longest + max_new_tokens > self.max_model_len:
            raise ValueError(
                f"The longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) "
                f"exceeds the vLLM server's max_model_len ({self.max_model_len}); restart "
                "`grpokit vllm-serve` with a larger --max-model-len."
            )

    def _payload(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingParams,
        extra: dict[str, Any],
        *,
        max_tokens: int | list[int],
        min_tokens: int | list[int],
        seed: int | list[int | None] | None,
    ) -> dict[str, Any]:
        """The body of `POST /generate` (docs/VLLM_SERVER.md)."""
        return {
            "prompt_ids": [list(map(int, p)) for p in prompt_ids],
            "n": n,
            "max_tokens": max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p or 0.0,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": seed,
            "min_tokens": min_tokens,
            "stop_token_ids": self.eos_token_ids,
            "generation_kwargs": extra,
        }

    def _post_generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        reply = self.connection.post("/generate", payload, what="a generation request")
        self._check_instance(reply, "/generate")
        return reply

    def _check_instance(self, reply: dict[str, Any], path: str) -> None:
        if "instance" not in reply:
            raise self.connection.malformed(path, "no 'instance'")
        if reply["instance"] != self.instance:
            raise VLLMServerError(
                f"The vLLM server at {self.url} restarted during the run: it now samples from "
                "the model it loaded at start, not from the policy being trained. Resume the "
                "run from its last checkpoint (--resume), which pushes the policy's weights again."
            )

    # ---- weights --------------------------------------------------------------------------------
    def sync_parameters(self, model: Any) -> list[Any]:
        """None of `model`'s parameters for the trainer to gather around `update_weights`:
        under DeepSpeed ZeRO-3 a push gathers the partitions of each tensor it sends, one
        tensor at a time (`OutgoingWeights`)."""
        del model
        return []

    def update_weights(self, model: Any) -> None:
        """Push the weights an optimizer step can change (see the class docstring)."""
        if _sharded(model):
            self._push_shards(model)
            return
        if _is_main_process():
            self._push(model, changed_only=True)
        _barrier()

    def _full_push_needed(self) -> bool:
        """Whether the server no longer holds our earlier pushes (first push, or another trainer
        opened its own group since), so that everything must be sent."""
        health = self.connection.get("/health", what="a weight update")
        self._check_instance(health, "/health")
        return self.group is None or health.get("group") != self.group.prefix

    @torch.no_grad()
    def _push(self, model: Any, *, changed_only: bool) -> None:
        """Send `model`'s weights (only those a step changes when `changed_only` and the server
        still holds our earlier pushes: same instance, same weight group)."""
        if self._full_push_needed():
            self.group, changed_only = None, False
        with merged_weights(model, changed_only=changed_only) as weights:
            self._check_weights(weights, complete=not changed_only)
            if weights:
                if self.group is None:
                    self.group = self._open_group(weights.device)
                self._send(self.group, weights)

    @torch.no_grad()
    def _push_shards(self, model: Any) -> None:
        """`update_weights` of a model sharded by FSDP2 or partitioned by ZeRO-3: every process
        gathers each whole tensor in turn (a collective; under FSDP2 cast to the server's dtype
        first) and process 0 sends it. Process 0 decides what is sent and checks it against
        the server's model; its verdict reaches the others first, so a refusal is an error on
        every process, never a wait."""
        main = _is_main_process()
        everything = _agreed(self._full_push_needed if main else None)
        if everything:
            self.group = None
        with merged_weights(model, changed_only=not everything, dtype=self.dtype) as weights:
            checked = functools.partial(self._check_weights, weights, complete=everything)
            _agreed(checked if main else None)
            if main and weights:
                if self.group is None:
                    self.group = self._open_group(weights.device)
                self._send(self.group, weights)
            elif not main:
                for _ in weights.tensors():  # the gathers process 0 makes
                    pass
        _barrier()

    def _send(self, group: WeightGroup, weights: OutgoingWeights) -> None:
        """Broadcast `weights` over `group` while `POST /update_weights` announces them."""
        payload = {
            "group": group.prefix,
            "names": weights.names,
            "shapes": [list(shape) for shape in weights.shapes],
        }
        failure: list[BaseException] = []

        def send() -> None:
            try:
                group.send(weights.shapes, weights.tensors(), self.dtype)
            except Exception as error:  # relayed to the caller below
                failure.append(error)

        sender = threading.Thread(target=send, name="grpokit-weight-send", daemon=True)
        sender.start()
        try:
            reply = self.connection.post("/update_weights", payload, what="a weight update")
        except (VLLMServerError, ValueError):
            self.group = None  # the server will not take this group's broadcasts any more
            sender.join(min(self.timeout, 10.0))
            raise
        sender.join(self.timeout)
        if failure or sender.is_alive():
            self.group = None
            reason = failure[0] if failure else "timed out"
            raise VLLMServerError(
                f"Sending weights to the vLLM server at {self.url} failed: {reason}"
            )
        self._check_instance(reply, "/update_weights")

    def _check_weights(self, weights: OutgoingWeights, *, complete: bool) -> None:
        """The server's model must have every tensor we send, with the same shape (and, when
        `complete`, no other)."""
        sent = {
            name: list(shape) for name, shape in zip(weights.names, weights.shapes, strict=True)
        }
        unknown = sorted(set(sent) - set(self.shapes))
        wrong = sorted(n for n in set(sent) & set(self.shapes) if sent[n] != self.shapes[n])
        missing = sorted(set(self.shapes) - set(sent)) if complete else []
        if unknown or wrong or missing:
            details = [
                f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for label, names in (
                    ("not in the server's model", unknown),
                    ("with other shapes there", wrong),
                    ("only in the server's model", missing),
                )
                if names
            ]
            raise VLLMServerError(
                f"The vLLM server at {self.url} serves a different model than the one being "
                f"trained (weights {'; '.join(details)}). Start `grpokit vllm-serve` with the "
                "training run's model."
            )

    def _open_group(self, device: torch.device) -> WeightGroup:
        """Host the rendezvous store, ask the server to join, and join the group as the sender."""
        backend = "nccl" if device.type == "cuda" and self.server_device == "cuda" else "gloo"
        host = urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"
        port = urllib.parse.urlsplit(self.url).port or 80
        address = local_address_towards(host, port)
        store = WeightGroup.host_store(self.group_port, self.timeout)
        prefix = f"grpokit-{uuid.uuid4().hex}"
        joined: list[WeightGroup] = []
        failure: list[BaseException] = []

        def join() -> None:
            try:
                group = WeightGroup(
                    store,
                    prefix=prefix,
                    rank=SENDER,
                    backend=backend,
                    address=address,
                    timeout=self.timeout,
                )
                joined.append(group)
            except Exception as error:  # relayed to the caller below
                failure.append(error)

        joiner = threading.Thread(target=join, name="grpokit-weight-group", daemon=True)
        joiner.start()
        payload = {
            "host": address,
            "port": store.port,
            "prefix": prefix,
            "backend": backend,
            "timeout": self.timeout,
        }
        self.connection.post("/init_weight_group", payload, what="opening the weight-update group")
        joiner.join(self.timeout)
        if not joined:
            reason = failure[0] if failure else "timed out"
            raise VLLMServerError(
                f"Could not open the weight-update group with the vLLM server at {self.url} "
                f"({backend}, this side {address}:{store.port}): {reason}. The server must reach "
                "this machine on vllm_group_port; set GLOO_SOCKET_IFNAME on both sides to pick "
                "the network interface."
            )
        return joined[0]

    def close(self) -> None:
        """Leave the weight-update group (the server keeps serving)."""
        if self.group is not None and _is_main_process():
            try:
                self.connection.post("/close_weight_group", {}, what="closing the weight group")
            except (VLLMServerError, ValueError) as error:
                logger.warning("%s", error)
        self.group = None


class _ServerTurns:
    """`overlapped_turns`' view of a `VLLMServerEngine` (`multi_turn.TurnSampler`): each
    `submit` is one `POST /generate` sent from `pool`, so several are in flight at once."""

    def __init__(
        self,
        engine: VLLMServerEngine,
        sampling: SamplingParams,
        extra: dict[str, Any],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.engine, self.sampling, self.extra, self.pool = engine, sampling, extra, pool
        self.running: list[Future[Sampled]] = []

    def submit(self, requests: list[TurnRequest]) -> list[Future[Sampled]]:
        payload = self.engine._payload(
            [r.prefix for r in requests],
            1,
            self.sampling,
            self.extra,
            max_tokens=[r.max_tokens for r in requests],
            min_tokens=[r.min_tokens for r in requests],
            seed=[r.seed for r in requests],
        )
        futures: list[Future[Sampled]] = [Future() for _ in requests]
        reply = self.pool.submit(self.engine._post_generate, payload)
        reply.add_done_callback(lambda done: self._deliver(done, futures))
        self.running += futures
        return futures

    def _deliver(self, reply: Future[dict[str, Any]], futures: list[Future[Sampled]]) -> None:
        """Split one reply into the futures of its requests (or fail them all with its error)."""
        try:
            body = reply.result()
            completions, logprobs = body.get("completion_ids"), body.get("logprobs")
            if not isinstance(completions, list):
                raise self.engine.connection.malformed("/generate", "no completion_ids")
            cached = body.get("cached_tokens") or [0] * len(futures)
            counts = {len(completions), len(cached), len(futures)}
            if logprobs is not None:
                counts.add(len(logprobs))
            if len(counts) > 1 or any(
                len(logprobs[i]) != len(c) for i, c in enumerate(completions) if logprobs
            ):
                raise self.engine.connection.malformed(
                    "/generate", "completions, log-probs or cached_tokens not one per prompt"
                )
            results = [
                Sampled(
                    [[int(t) for t in completions[i]]],
                    None if logprobs is None else [[float(x) for x in logprobs[i]]],
                    int(cached[i]),
                )
                for i in range(len(futures))
            ]
        except Exception as error:  # relayed to the turn loop through the futures
            for future in futures:
                future.set_exception(error)
            return
        for future, result in zip(futures, results, strict=True):
            future.set_result(result)

    def advance(self, replies: Collection[Future[Any]]) -> None:
        self.running = [f for f in self.running if not f.done()]
        wait_for_any([*self.running, *replies])
