"""flm-rt serve: the batching engine in process, then the real server (uvicorn in a subprocess on a free port)
driven by the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flm_rt

import httpx2 as httpx  # the HTTP client huggingface_hub and the openai package use
from prometheus_client.parser import text_string_to_metric_families

from conftest import small_config
from flm_rt.serving.engine import (
    BatchingEngine, EngineConfig, Job, QueueFullError, RequestTimeoutError, group_jobs, run_batch,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-gpt2"


def openai_module():
    """The official client, for the tests that drive the server with it (the others use raw HTTP)."""
    return pytest.importorskip("openai", reason="the openai client is not installed (pip install 'flm_rt[dev]')")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / NAME
    flm_rt.random_model(small_config(), seed=0, output_scale=6.0).save(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return flm_rt.load(model_dir, device="cpu")


def expected(model, n, seed, steps=1, stochasticity=0.0, **kw):
    return flm_rt.generate(model, num_samples=n, seed=seed, steps=steps, stochasticity=stochasticity, **kw)


# ------------------------------------------------------------------------------------------ engine, in process
def job(n=1, steps=1, s=0.0, seed=0, length=16, max_tokens=16, stream_steps=False):
    return Job(n=n, steps=steps, stochasticity=s, length=length, seed=seed, max_tokens=max_tokens,
               stream_steps=stream_steps)


def test_group_jobs_by_key_and_size():
    jobs = [job(n=3), job(n=2, steps=2), job(n=3), job(n=1), job(n=5, steps=2)]
    assert group_jobs(jobs, max_batch=6) == [[0, 2], [3], [1], [4]]
    assert group_jobs([job(n=9)], max_batch=4) == [[0]]  # a job bigger than the batch runs alone


def test_run_batch_equals_generate_alone(model):
    """Mixed seeds and sizes in one call: each job gets exactly what generate(seed=...) gives it alone."""
    jobs = [job(n=2, seed=7, steps=2, s=0.6), job(n=1, seed=8, steps=2, s=0.6, max_tokens=5),
            job(n=3, seed=7, steps=2, s=0.6)]
    results = run_batch(model, jobs)
    assert {r.batch_size for r in results} == {6} and len({r.batch_id for r in results}) == 1
    for j, r in zip(jobs, results):
        ref = expected(model, j.n, j.seed, 2, 0.6)
        assert [s.token_ids for s in r.samples] == ref.token_ids[:, :j.max_tokens].tolist()
        if j.max_tokens == 16:
            assert [s.text for s in r.samples] == ref.text
            assert all(s.finish_reason == "stop" for s in r.samples)
        else:
            assert all(s.finish_reason == "length" for s in r.samples)
    with pytest.raises(ValueError, match="one"):
        run_batch(model, [job(steps=1), job(steps=2)])


def test_engine_batches_times_out_and_bounds_its_queue(model):
    from flm_rt.serving.metrics import ServingMetrics

    async def scenario():
        metrics = ServingMetrics()
        eng = BatchingEngine(model, EngineConfig(max_batch=8, max_wait_ms=200, max_queue=4, timeout_s=30), metrics)
        eng.start()
        together = await asyncio.gather(*(eng.submit(job(seed=s)) for s in range(4)))
        assert all(r.batch_size == 4 for r in together)  # arrived together: one generate call
        # Queue bound: a slow batch runs; 4 wait; the 5th is refused.
        slow = asyncio.ensure_future(eng.submit(job(steps=40, s=1.0, seed=1)))
        await asyncio.sleep(0.3)  # past max_wait: the slow job is running, not queued
        waiting = [eng.enqueue(job(seed=10 + i)) for i in range(4)]
        with pytest.raises(QueueFullError, match="queue is full"):
            eng.enqueue(job())
        # A waiter that gives up (timeout or client gone) leaves the queue; the others are served.
        gone = asyncio.ensure_future(eng.result(waiting[0]))
        await asyncio.sleep(0)
        gone.cancel()
        rest = await asyncio.gather(*(eng.result(p) for p in waiting[1:]))
        assert [r.samples[0].token_ids for r in rest] == [expected(model, 1, 11 + i).token_ids[0].tolist()
                                                          for i in range(3)]
        await slow
        await eng.stop()
        short = BatchingEngine(model, EngineConfig(max_batch=8, max_wait_ms=0, timeout_s=0.2))
        short.start()
        with pytest.raises(RequestTimeoutError, match="0.2 s"):
            await short.submit(job(steps=100))
        assert short.queue_depth == 0
        await short.stop()  # the batch that held the timed-out job ran to its end
        return metrics
    metrics = asyncio.run(scenario())
    sizes = {s.labels["le"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
             if f.name == "flm_rt_batch_size" for s in f.samples if s.name.endswith("_bucket")}
    assert sizes["1.0"] < sizes["+Inf"]  # some batch held more than one sample


# ------------------------------------------------------------------------------------------ the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, "-m", "flm_rt.cli", "serve", str(model_dir), "--port",
                                      str(self.port), "--model-name", NAME, *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become ready in 90 s")

    def client(self, **kw):
        return openai_module().OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(model_dir, "--max-wait-ms", 30, "--max-n", 8, "--max-body-kb", 4)
    yield srv
    log = srv.stop()
    assert "Traceback" not in log, log


def metric_samples(url) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": NAME}


def test_completion_with_seed_n_and_flm_fields(server, model):
    out = server.client().completions.create(model=NAME, prompt="", n=3, seed=5,
                                             extra_body={"steps": 2, "stochasticity": 0.5})
    ref = expected(model, 3, 5, 2, 0.5)
    assert out.object == "text_completion" and out.model == NAME and len(out.choices) == 3
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == ref.text
    assert [c.token_ids for c in out.choices] == ref.token_ids.tolist()
    assert all(c.finish_reason == "stop" for c in out.choices)
    assert out.usage.prompt_tokens == 0 and out.usage.completion_tokens == 48 and out.usage.total_tokens == 48
    cut = server.client().completions.create(model=NAME, prompt="", seed=5, max_tokens=6,
                                             extra_body={"steps": 2, "stochasticity": 0.5})
    assert cut.choices[0].token_ids == ref.token_ids[0, :6].tolist() and cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 6
    unseeded = server.client().completions.create(model=NAME, prompt="")
    assert unseeded.choices[0].token_ids == expected(model, 1, unseeded.seed).token_ids[0].tolist()


def test_streaming(server, model):
    chunks = list(server.client().completions.create(model=NAME, prompt="", n=2, seed=9, stream=True))
    ref = expected(model, 2, 9)
    assert [(c.choices[0].index, c.choices[0].text) for c in chunks] == [(0, ref.text[0]), (1, ref.text[1])]
    steps = list(server.client().completions.create(model=NAME, prompt="", seed=9, stream=True,
                                                    extra_body={"steps": 3, "stochasticity": 0.3}))
    ref = expected(model, 1, 9, 3, 0.3)
    assert [c.step for c in steps[:-1]] == [0, 1] and all(c.choices[0].text == "" for c in steps[:-1])
    assert all(isinstance(c.choices[0].estimate, str) for c in steps[:-1])
    assert "".join(c.choices[0].text for c in steps) == ref.text[0] and steps[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_equal_serial_calls(server):
    client = server.client()

    def call(seed):
        return client.completions.create(model=NAME, prompt="", seed=seed, max_tokens=12).choices[0].text
    before = metric_samples(server.url)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        concurrent_texts = list(pool.map(call, range(100, 132)))
    after = metric_samples(server.url)
    serial = [call(seed) for seed in range(100, 132)]
    assert concurrent_texts == serial
    assert len(set(serial)) == 32

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    batches = delta("flm_rt_batch_size_count")
    assert delta("flm_rt_batch_size_sum") == 32 and batches < 32  # merged: fewer generate calls than requests
    assert delta("flm_rt_batch_size_bucket", le="1.0") < batches  # at least one batch held > 1 sample
    assert delta("flm_rt_requests_total", status="200") == 32
    assert delta("flm_rt_tokens_generated_total") == 32 * 12
    assert delta("flm_rt_request_latency_seconds_count") == 32
    assert ("flm_rt_queue_depth", ()) in after


def raw_post(url, body, headers=None):
    return httpx.post(url + "/v1/completions", content=body, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("body,status,message", [
    ({"prompt": "Once upon a time"}, 400, "generate unconditionally"),
    ({"prompt": [[1, 2]]}, 400, "generate unconditionally"),
    ({"max_tokens": 17}, 400, "max_tokens must be between 1 and the generated length 16"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"n": 0}, 400, "n must be between 1 and 8"),
    ({"n": 9}, 400, "n must be between 1 and 8"),
    ({"n": "2"}, 400, "invalid value for n"),
    ({"model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ({"steps": 0}, 400, "steps must be"),
    ({"stochasticity": 1.5}, 400, "stochasticity"),
    ({"seed": -1}, 400, "seed"),
    ({"seq_len": 40}, 400, "seq_len"),
    ({"temperatur": 1}, 400, "unrecognized request argument supplied: temperatur"),
    ({"logprobs": 2}, 400, "logprobs"),
    ("{\"model\": \"tiny-gpt2\", ", 400, "malformed JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"model": None}, 400, "model"),
    ({"user": "x" * 5000}, 413, "larger than 4096 bytes"),
])
def test_bad_requests_get_clear_errors(server, body, status, message):
    if isinstance(body, dict):
        body = json.dumps({"model": NAME, "prompt": "", **body})
    r = raw_post(server.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] and "Traceback" not in r.text


def test_bad_requests_through_the_openai_client(server):
    openai = openai_module()
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="generate unconditionally"):
        client.completions.create(model=NAME, prompt="Hello")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="")
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # A declared length over the limit is refused before the body is read.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 999999\r\n\r\n{")
        head = b""
        while b"request_too_large" not in head:  # head and body may arrive in separate segments
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head = head.decode()
    assert head.startswith("HTTP/1.1 413") and "request_too_large" in head


def test_client_disconnect_does_not_break_the_batch(server, model):
    """A client that hangs up while its request waits in a batch: the others get their answers."""
    client = server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        quitters = [pool.submit(lambda s: httpx.post(server.url + "/v1/completions", timeout=0.05, json={
            "model": NAME, "prompt": "", "seed": s, "steps": 4, "stochasticity": 1.0}), s) for s in range(4)]
        stayers = [pool.submit(lambda s: client.completions.create(model=NAME, prompt="", seed=s, extra_body={
            "steps": 4, "stochasticity": 1.0}).choices[0].token_ids, s) for s in range(4, 8)]
        for q in quitters:
            with pytest.raises(httpx.TimeoutException):
                q.result()
        got = [s.result() for s in stayers]
    assert got == [expected(model, 1, s, 4, 1.0).token_ids[0].tolist() for s in range(4, 8)]
    assert httpx.get(server.url + "/health").status_code == 200


def wait_for_metric(url, name, value, timeout=60.0):
    deadline = time.monotonic() + timeout
    while metric_samples(url).get((name, ()), 0) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_sigterm_finishes_requests_in_flight_and_429_when_full(model_dir):
    srv = Server(model_dir, "--max-queue", 1, "--max-wait-ms", 0)
    try:
        slow = dict(model=NAME, prompt="", steps=80)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, srv.url + "/v1/completions", json={**slow, "seed": 1}, timeout=120)
            wait_for_metric(srv.url, "flm_rt_running_samples", 1)
            queued = pool.submit(httpx.post, srv.url + "/v1/completions", json={**slow, "seed": 2}, timeout=120)
            wait_for_metric(srv.url, "flm_rt_queue_depth", 1)
            full = httpx.post(srv.url + "/v1/completions", json={**slow, "seed": 3}, timeout=60)
            assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
            assert not running.done()
            srv.proc.send_signal(signal.SIGTERM)
            results = [running.result(), queued.result()]
        assert [r.status_code for r in results] == [200, 200]
        assert all(len(r.json()["choices"][0]["token_ids"]) == 16 for r in results)
        assert srv.proc.wait(60) == 0  # a completed graceful shutdown is a normal exit
        with pytest.raises(httpx.TransportError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        log = srv.stop()
    assert "Traceback" not in log and "Waiting for" in log, log


def test_serve_cli_errors_exit_2():
    out = subprocess.run([sys.executable, "-m", "flm_rt.cli", "serve", "/nonexistent/model"], capture_output=True,
                         text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and "flm-rt: error:" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,match", [(["--max-batch", "0"], "--max-batch"), (["--max-wait-ms", "-1"], "max-wait"),
                                        (["--port", "x"], "--port")])
def test_serve_bad_options(args, match, capsys):
    from flm_rt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "model", *args])
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_bench_serve_against_the_running_server(server, tmp_path):
    from flm_rt.benchmarks.cli import cli_bench

    assert cli_bench(["serve", "--url", server.url, "--concurrency", "1,3", "--min-requests", "3",
                      "--requests-per-client", "1", "--max-tokens", "8", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert [(lv["concurrency"], lv["requests"], lv["errors"]) for lv in data["levels"]] == [(1, 3, 0), (3, 3, 0)]
    assert all(lv["p99_ms"] >= lv["p50_ms"] > 0 and lv["tokens_per_s"] > 0 for lv in data["levels"])
    assert (tmp_path / "serve.png").stat().st_size > 0 and "| as running | 3 |" in (tmp_path / "results.md").read_text()
