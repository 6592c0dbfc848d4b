"""Triton Inference Server front end (issue 12), against the REAL tritonserver 2.51 from the
nvidia-pytriton wheel and the real tritonclient library.

Fast tests check the exported repository with Triton's own config schema (tritonclient's
model_config_pb2) and the request parsing. The end-to-end tests start one server on free
loopback ports with an exported SmolLM2 repository and talk to it over gRPC streaming and HTTP
SSE; the reference output is llmc's own in-process LLM. The last test stops the server and
checks that no stub process and no shared-memory region is left.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from llmc.errors import LlmcError, UnsupportedError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The history of the United States begins"


# ---- fast: the exported repository and the request parsing ----------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_checkpoints, tmp_path_factory) -> Path:
    from llmc.build import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("eng") / "tiny"
    build_engine(tiny_checkpoints["llama"], out, BuildOptions(max_batch_size=4, max_input_len=32,
                                                             max_seq_len=64, tokens_per_block=16))
    return out


def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_repository_is_a_valid_triton_config(tiny_engine, tmp_path):
    from llmc.cli.app import main

    repo = tmp_path / "repo"
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo), "--model-name", "tiny",
                 "--instances", "2", "--max-batch-size", "3", "--kv-cache-mb", "8"]) == 0
    cfg = _parse_config(repo / "tiny" / "config.pbtxt")  # Triton's own schema
    assert cfg.name == "tiny" and cfg.backend == "python" and cfg.max_batch_size == 3
    assert cfg.model_transaction_policy.decoupled
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, cfg.instance_group[0].KIND_CPU)]
    ins = {i.name: i for i in cfg.input}
    assert set(ins) == {"text_input", "max_tokens", "stream", "temperature", "top_k", "top_p",
                        "random_seed", "stop_words", "end_id", "pad_id"}
    assert not ins["text_input"].optional and all(i.optional for n, i in ins.items() if n != "text_input")
    assert {o.name for o in cfg.output} == {"text_output", "output_ids", "finish_reason"}
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert Path(params["engine_dir"]) == tiny_engine.resolve()
    assert params["EXECUTION_ENV_PATH"].endswith("triton-env")
    assert (repo / "tiny" / "1" / "llmc_path" / "llmc" / "serve" / "triton" / "backend.py").is_file()
    assert [p.name for p in (repo / "tiny" / "1" / "llmc_path").iterdir()] == ["llmc"]
    assert (repo / "tiny" / "1" / "model.py").is_file() and not (repo / "tiny" / "1" / "engine").exists()
    # --copy-engine: the engine travels with the repository, referenced relatively
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo), "--model-name", "tiny",
                 "--copy-engine", "--force"]) == 0
    params = {k: v.string_value for k, v in _parse_config(repo / "tiny" / "config.pbtxt").parameters.items()}
    assert params["engine_dir"] == "engine"
    assert (repo / "tiny" / "1" / "engine" / "config.json").read_bytes() == (tiny_engine / "config.json").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--max-batch-size", "5"], "exceeds the engine's max_batch_size 4"),
    (["--instances", "0"], "--instances must be >= 1"),
    (["--model-name", "a/b"], "--model-name"),
])
def test_export_refuses_bad_options(tiny_engine, tmp_path, capsys, args, message):
    from llmc.cli.app import main

    assert main(["export", "triton", str(tiny_engine), "-o", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_export_never_overwrites_without_force(tiny_engine, tmp_path, capsys):
    from llmc.cli.app import main

    repo = tmp_path / "repo"
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo)]) == 0
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo), "--force"]) == 0
    mine = repo / "mine"  # a user's own model directory is never replaced, even with --force
    (mine / "1").mkdir(parents=True)
    (mine / "config.pbtxt").write_text('name: "mine"\nbackend: "python"\n')
    assert main(["export", "triton", str(tiny_engine), "-o", str(repo), "--model-name", "mine", "--force"]) == 2
    assert "not an llmc triton-model" in capsys.readouterr().err
    assert (mine / "config.pbtxt").read_text().startswith('name: "mine"')
    assert main(["export", "triton", str(tiny_engine), "-o", str(tiny_engine / "repo")]) == 2
    assert "inside the input" in capsys.readouterr().err


def test_parse_request_tensorrt_llm_conventions():
    from llmc.serve.triton.backend import parse_request

    eos = frozenset({2})
    p = parse_request({"text_input": np.array([[b"hi"]], dtype=object), "max_tokens": np.array([[7]], np.int32),
                       "stream": np.array([[True]]), "top_p": np.array([[0.0]], np.float32),
                       "top_k": np.array([[0]], np.int32), "random_seed": np.array([[5]], np.uint64),
                       "stop_words": np.array([[b"", b"\n\n"]], dtype=object), "end_id": np.array([[-1]], np.int32),
                       "pad_id": np.array([[2]], np.int32)}, eos)
    assert (p.prompt, p.stream) == ("hi", True)
    assert (p.params.max_tokens, p.params.top_p, p.params.top_k, p.params.seed) == (7, 1.0, 0, 5)
    assert p.params.stop == ["\n\n"] and p.params.ignore_eos
    assert not parse_request({"text_input": np.array([b"x"], dtype=object), "end_id": np.array([2])}, eos).params.ignore_eos
    for bad, msg in [({"max_tokens": np.array([[-3]], np.int32)}, "max_tokens must be >= 1"),
                     ({"end_id": np.array([[9]], np.int32)}, "end_id 9 is not an EOS token"),
                     ({"text_input": np.array([[b"a"], [b"b"]], dtype=object)}, "one prompt per request"),
                     ({"temperature": np.array([[-1.0]], np.float32)}, "temperature")]:
        with pytest.raises(LlmcError, match=msg):
            parse_request({"text_input": np.array([[b"x"]], dtype=object), **bad}, eos)
    with pytest.raises(LlmcError, match="text_input is required"):
        parse_request({}, eos)


def test_platform_check_names_the_glibc_floor(monkeypatch):
    from llmc.serve.triton import env

    monkeypatch.setattr(env, "glibc_version", lambda: (2, 31))
    with pytest.raises(UnsupportedError, match=r"needs glibc >= 2\.35; this machine has glibc 2\.31"):
        env.check_platform()


def test_triton_venv_records_the_interpreter_it_was_made_from(tmp_path):
    """ensure_triton_env remakes its venv when llmc runs on another Python than the one the venv
    was made from: `venv_base` reads that interpreter from pyvenv.cfg."""
    from llmc.serve.triton import env

    assert env.venv_base(tmp_path) is None
    (tmp_path / "pyvenv.cfg").write_text(f"home = /x\nexecutable = {sys.executable}\nversion = 3.11.7\n")
    assert env.venv_base(tmp_path) == str(Path(sys.executable).resolve())
    exe, _, _ = env.base_python()
    real = subprocess.run([str(exe), "-m", "venv", "--without-pip", str(tmp_path / "v")], check=True)
    assert real.returncode == 0 and env.venv_base(tmp_path / "v") == str(exe)


def test_serving_modules_do_not_import_torch():
    """Triton's model venv has no torch: what model.py imports must not need it."""
    code = ("import sys; import llmc.serve.triton.backend, llmc.serve.engine_loop, llmc.runtime.llm, "
            "llmc.engine.engine, llmc.engine.backends.onnxruntime, llmc.tokenizer; "
            "print(sorted(m for m in ('torch', 'modelopt', 'tensorrt') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.strip() == "[]"


def test_model_py_refuses_numpy2():
    """The main venv has numpy 2: the exported model.py must refuse to load there, clearly."""
    from llmc.serve.triton import export

    proc = subprocess.run([sys.executable, str(export.TEMPLATE)], capture_output=True, text=True)
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has numpy<2")
    assert proc.returncode != 0
    assert "numpy 2" in proc.stderr and "corrupts tensors" in proc.stderr


# ---- end to end: the real tritonserver ------------------------------------------------------
@pytest.fixture(scope="module")
def triton_env():
    from llmc.serve.triton.env import check_platform, ensure_triton_env

    try:
        check_platform()
    except UnsupportedError as exc:
        pytest.skip(str(exc))
    try:
        return ensure_triton_env()
    except UnsupportedError as exc:
        pytest.skip(f"the Triton server wheel cannot be installed here: {exc}")


@pytest.mark.slow
def test_triton_refuses_a_numpy2_model_environment(triton_env, smollm2_engine, tmp_path):
    """EXECUTION_ENV_PATH at an environment with numpy 2 (this test's own venv): the real server
    does not load the model, and its log says why."""
    from llmc.serve.triton.export import ExportOptions, export_triton
    from llmc.serve.triton.launch import TritonServer, free_port

    if int(np.__version__.split(".")[0]) < 2 or sys.prefix == sys.base_prefix:
        pytest.skip("needs this test to run in a venv with numpy 2")
    export_triton(smollm2_engine, tmp_path / "repo", ExportOptions(env_path=sys.prefix))
    with open(tmp_path / "server.log", "w") as log:
        srv = TritonServer(triton_env, tmp_path / "repo", free_port(), free_port(), free_port(),
                           host="127.0.0.1", log=log)
        with pytest.raises(LlmcError, match="tritonserver exited"):
            srv.start(timeout=120)
    text = (tmp_path / "server.log").read_text()
    assert "numpy 2" in text and "corrupts tensors" in text, text[-2000:]
    assert not srv.group_alive() and not srv.shm_regions()


@pytest.fixture(scope="module")
def server(triton_env, smollm2_engine, tmp_path_factory):
    from llmc.serve.triton.export import ExportOptions, export_triton
    from llmc.serve.triton.launch import TritonServer, free_port

    tmp = tmp_path_factory.mktemp("triton")
    export_triton(smollm2_engine, tmp / "repo", ExportOptions(kv_cache_mb=160, env_path=str(triton_env.root)))
    log = open(tmp / "tritonserver.log", "w")
    srv = TritonServer(triton_env, tmp / "repo", free_port(), free_port(), free_port(), host="127.0.0.1", log=log)
    srv.shm_before = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    try:
        srv.start(timeout=180)
    except LlmcError:
        log.flush()
        pytest.fail(f"tritonserver did not start:\n{(tmp / 'tritonserver.log').read_text()[-3000:]}")
    srv.log_path = tmp / "tritonserver.log"
    yield srv
    srv.stop()
    log.close()


@pytest.fixture(scope="module")
def reference_llm(smollm2_engine):
    from llmc.runtime.llm import LLM

    return LLM(smollm2_engine, kv_cache_mb=32)


def _inputs(prompt: str | None, max_tokens: int | None = 16, stream: bool = True, end_id: int | None = None,
            sampling: dict | None = None):
    from tritonclient.grpc import InferInput

    def tensor(name, arr, dtype):
        t = InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    ins = [tensor("stream", np.array([[stream]], dtype=bool), "BOOL")]
    if prompt is not None:
        ins.append(tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"))
    if max_tokens is not None:
        ins.append(tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"))
    if end_id is not None:
        ins.append(tensor("end_id", np.array([[end_id]], dtype=np.int32), "INT32"))
    for name, (value, dtype, triton_type) in (sampling or {}).items():
        ins.append(tensor(name, np.array([[value]], dtype=dtype), triton_type))
    return ins


class GrpcStreams:
    """One gRPC bidirectional stream carrying many requests; collects responses per request id."""

    def __init__(self, srv):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        self.responses: dict[str, list] = {}
        self.errors: list[str] = []  # tritonclient drops the request id of stream errors
        self.finished: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error):
        with self.lock:
            if error is not None:
                self.errors.append(str(error))
                return
            resp = result.get_response()
            rid = resp.id
            if result.as_numpy("text_output") is not None:
                self.responses.setdefault(rid, []).append(
                    (result.as_numpy("text_output").reshape(-1)[0].decode(),
                     [int(t) for t in result.as_numpy("output_ids").reshape(-1)],
                     None if result.as_numpy("finish_reason") is None else result.as_numpy("finish_reason").reshape(-1)[0].decode()))
            if resp.parameters["triton_final_response"].bool_param:
                self.finished[rid].set()

    def send(self, rid: str, inputs) -> None:
        self.finished[rid] = threading.Event()
        self.client.async_stream_infer("llmc", inputs, request_id=rid, enable_empty_final_response=True)

    def wait(self, rids, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for rid in rids:
            assert self.finished[rid].wait(max(0.0, deadline - time.monotonic())), \
                f"request {rid} never finished (stream errors: {self.errors})"

    def text(self, rid: str) -> str:
        return "".join(r[0] for r in self.responses.get(rid, []))

    def ids(self, rid: str) -> list[int]:
        return [t for r in self.responses.get(rid, []) for t in r[1]]

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def _metrics(srv) -> dict[str, float]:
    """llmc_* and nv_* samples of the metrics endpoint, summed over labels (name -> value)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        if "reason=" in name_labels:
            name += "{" + name_labels.split("reason=")[1].split('"')[1] + "}"
        out[name] = out.get(name, 0.0) + float(value)
    return out


def _settled_metrics(srv) -> dict[str, float]:
    """Metrics once the engine is idle and the llmc_* gauges (refreshed every 0.2 s) caught up."""
    _wait_metric(srv, lambda m: m["llmc_num_running"] == 0 and m["llmc_num_waiting"] == 0)
    time.sleep(0.6)
    return _metrics(srv)


def _wait_metric(srv, pred, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _metrics(srv)
        if pred(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


@pytest.mark.slow
def test_grpc_stream_greedy_matches_llmc(server, reference_llm):
    from llmc.runtime.sampling import SamplingParams

    ref = reference_llm.generate([PROMPT], SamplingParams(max_tokens=24))[0]
    sampled = reference_llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.8, top_k=40,
                                                               top_p=0.9, seed=7))[0]
    s = GrpcStreams(server)
    try:
        s.send("g1", _inputs(PROMPT, 24))
        s.send("s1", _inputs(PROMPT, 16, sampling={"temperature": (0.8, np.float32, "FP32"),
                                                   "top_k": (40, np.int32, "INT32"),
                                                   "top_p": (0.9, np.float32, "FP32"),
                                                   "random_seed": (7, np.uint64, "UINT64")}))
        s.wait(["g1", "s1"])
    finally:
        s.close()
    assert s.ids("s1") == sampled.output_token_ids, "same seed, same sampled tokens"
    assert s.ids("g1") == ref.output_token_ids, "token for token"
    assert s.text("g1") == ref.text
    assert len(s.responses["g1"]) > 1, "streamed, not one response"
    assert s.responses["g1"][-1][2] == ref.finish_reason


@pytest.mark.slow
def test_http_generate_stream_sse_and_generate(server, reference_llm):
    from llmc.runtime.sampling import SamplingParams

    ref = reference_llm.generate([PROMPT], SamplingParams(max_tokens=12))[0]
    body = json.dumps({"text_input": PROMPT, "max_tokens": 12, "stream": True}).encode()
    req = urllib.request.Request(f"{server.url}/v2/models/llmc/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=120) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert len(events) > 1 and all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events) == ref.text
    ids = [e["output_ids"] if isinstance(e["output_ids"], list) else [e["output_ids"]] for e in events]
    assert [t for i in ids for t in i] == ref.output_token_ids  # one id comes back as a JSON scalar
    # /generate with stream=false: exactly one response, the whole text
    req = urllib.request.Request(f"{server.url}/v2/models/llmc/generate",
                                 data=json.dumps({"text_input": PROMPT, "max_tokens": 12}).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert out["text_output"] == ref.text and out["finish_reason"] == ref.finish_reason
    # stop_words: cut where llmc's own stop-string handling cuts
    stop = ref.text.split()[2]
    ref_stop = reference_llm.generate([PROMPT], SamplingParams(max_tokens=12, stop=[stop]))[0]
    req = urllib.request.Request(f"{server.url}/v2/models/llmc/generate",
                                 data=json.dumps({"text_input": PROMPT, "max_tokens": 12,
                                                  "stop_words": ["", stop]}).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert out["text_output"] == ref_stop.text and stop not in out["text_output"]
    assert out["finish_reason"] == "stop"


@pytest.mark.slow
def test_32_concurrent_streams_finish_with_their_token_counts(server):
    before = _settled_metrics(server)
    s = GrpcStreams(server)
    want = {f"c{i}": 4 + i % 9 for i in range(32)}
    try:
        for i, (rid, n) in enumerate(want.items()):
            s.send(rid, _inputs(f"{PROMPT} (request {i}) and", n, end_id=-1))
        s.wait(list(want))
    finally:
        s.close()
    assert not s.errors
    assert {rid: len(s.ids(rid)) for rid in want} == want
    assert all(s.responses[rid][-1][2] == "length" for rid in want)
    total = sum(want.values())
    m = _wait_metric(server, lambda m: m["llmc_generation_tokens"] >= before["llmc_generation_tokens"] + total)
    assert m["llmc_generation_tokens"] - before["llmc_generation_tokens"] == total
    steps = m["llmc_steps"] - before["llmc_steps"]
    assert steps < total / 2, f"{steps} engine steps for {total} tokens: requests were not batched in flight"
    assert m["llmc_kv_blocks_total"] > 0 and m["nv_inference_request_success"] >= 32


@pytest.mark.slow
def test_cancelled_streams_free_kv_blocks(server):
    before = _settled_metrics(server)
    s = GrpcStreams(server)
    rids = [f"x{i}" for i in range(4)]
    for rid in rids:
        s.send(rid, _inputs(f"{PROMPT} {rid}", 200, end_id=-1))
    deadline = time.monotonic() + 120
    while any(len(s.ids(r)) < 2 for r in rids) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:  # the llmc_* gauges are refreshed every 0.2 s: wait for them to show the streams
        busy = _wait_metric(server, lambda m: m["llmc_kv_blocks_used"] > 0 and m["llmc_num_running"] >= 1)
        assert busy["llmc_kv_blocks_used"] > 0 and busy["llmc_num_running"] >= 1
    finally:  # cancel even if the check failed, so the next test's server is not left busy
        s.close(cancel=True)
    m = _wait_metric(server, lambda m: m["llmc_kv_blocks_used"] == 0 and m["llmc_num_running"] == 0
                     and m.get("llmc_requests_finished{abort}", 0) >= before.get("llmc_requests_finished{abort}", 0) + 4)
    assert m["llmc_kv_blocks_used"] == 0 and m["llmc_num_running"] == 0 and m["llmc_num_waiting"] == 0
    assert m["llmc_requests_finished{abort}"] >= before.get("llmc_requests_finished{abort}", 0) + 4
    assert all(len(s.ids(r)) < 200 for r in rids), "the streams were cut short"
    assert server.is_ready()
    s2 = GrpcStreams(server)  # still serving
    try:
        s2.send("after", _inputs(PROMPT, 5, end_id=-1))
        s2.wait(["after"])
    finally:
        s2.close()
    assert len(s2.ids("after")) == 5


@pytest.mark.slow
def test_bad_requests_get_errors_while_others_stream(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    s = GrpcStreams(server)
    try:
        s.send("long", _inputs(PROMPT, 40, end_id=-1))
        while not s.ids("long"):
            time.sleep(0.02)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        errors = queue.Queue()
        client.start_stream(callback=lambda result, error: errors.put(error))
        client.async_stream_infer("llmc", _inputs(None, 8), request_id="bad-missing")
        client.async_stream_infer("llmc", _inputs(PROMPT, -5), request_id="bad-negative")
        client.async_stream_infer("llmc", _inputs("word " * 2000, 4), request_id="bad-long")
        got = [errors.get(timeout=30) for _ in range(3)]
        client.stop_stream()
        client.close()
        s.wait(["long"])
    finally:
        s.close()
    assert all(isinstance(e, InferenceServerException) for e in got)
    text = " | ".join(str(e) for e in got)
    assert "text_input" in text and "max_tokens must be >= 1" in text and "allows at most" in text, text
    assert len(s.ids("long")) == 40 and s.responses["long"][-1][2] == "length"
    # HTTP: the same mistake is a Triton error body
    req = urllib.request.Request(f"{server.url}/v2/models/llmc/generate",
                                 data=json.dumps({"text_input": "x", "max_tokens": -1}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        body = urllib.request.urlopen(req, timeout=30).read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
    assert "max_tokens must be >= 1" in body
    assert server.is_ready()


@pytest.mark.slow
def test_llmc_serve_frontend_triton_cli(triton_env, smollm2_engine, tmp_path):
    """`llmc serve --frontend triton`: the real server on the given ports, two model instances;
    SIGTERM stops it cleanly."""
    import signal

    from llmc.serve.triton.launch import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llmc.cli.app", "serve", str(smollm2_engine), "--frontend", "triton",
                             "--host", "127.0.0.1", "--http-port", str(http), "--grpc-port", str(grpc),
                             "--metrics-port", str(metrics), "--kv-cache-mb", "64", "--instances", "2"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    shm = f"llmc_{proc.pid}_"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/llmc/generate",
                                     data=json.dumps({"text_input": PROMPT, "max_tokens": 4, "end_id": -1}).encode(),
                                     headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert out["finish_reason"] == "length" and len(out["output_ids"]) == 4
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
        kv = [line for line in text.splitlines() if line.startswith("llmc_kv_blocks_total{")]
        assert len(kv) == 2, f"one KV pool per instance (--instances 2): {kv}"
        assert list(Path("/dev/shm").glob(shm + "*")), "the stub's shared memory, named after this server"
        server_pids = [int(p.name) for p in Path("/proc").glob("[0-9]*") if f"--http-port={http}" in _cmdline(p)]
        assert len(server_pids) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        leftovers = []
        if proc.poll() is None:  # a failed check: stop it the way a user would, so it cleans up
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        leftovers = [p for p in Path("/proc").glob("[0-9]*") if shm in _cmdline(p) or f"--http-port={http}" in _cmdline(p)]
        for p in leftovers:  # tritonserver runs in its own session: a killed `llmc serve` leaves it
            try:
                os.killpg(int(p.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for region in Path("/dev/shm").glob(shm + "*"):
            region.unlink(missing_ok=True)
    assert not leftovers, "tritonserver or a stub outlived `llmc serve`"
    assert not list(Path("/dev/shm").glob(shm + "*"))


@pytest.mark.slow
def test_clean_shutdown_leaves_no_stub_and_no_shared_memory(server):
    stub_marker = server.shm_prefix
    stubs = [p for p in Path("/proc").glob("[0-9]*") if stub_marker in _cmdline(p)]
    assert stubs, "the Python stub should be running while the server is up"
    assert server.shm_regions(), "the stub's shared-memory region should exist while the server is up"
    assert server.stop() == 0
    assert not server.killed_leftovers, "the server left processes that had to be killed"
    assert not server.leaked_shm, f"the server left shared memory behind: {server.leaked_shm}"
    assert not [p for p in Path("/proc").glob("[0-9]*") if stub_marker in _cmdline(p)], "orphan stub process"
    assert not server.shm_regions()
    assert set(Path("/dev/shm").glob("triton_python_backend_shm_region_*")) <= server.shm_before
    assert "llmc: " in server.log_path.read_text()


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_serve_frontend_triton_user_errors_are_one_line(tiny_engine, tmp_path):
    for args, msg in (([str(tmp_path / "nope")], "no such engine directory"),
                      ([str(tiny_engine), "--grpc-port", "70000"], "--grpc-port must be in 1..65535")):
        r = subprocess.run([sys.executable, "-m", "llmc.cli.app", "serve", *args, "--frontend", "triton"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr
