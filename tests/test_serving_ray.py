"""The batching engine on Ray Serve: a local Ray cluster (2 CPUs), two CPU replicas behind the OpenAI-compatible
ingress, driven by the official openai client. Bounded: one cluster, a few requests, shut down at the end."""
from __future__ import annotations

import concurrent.futures
import os
import socket
import time
from pathlib import Path

import pytest

import flm_rt

# Module-level: the one test here needs both the Ray cluster and the openai client.
ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'flm_rt[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install 'flm_rt[dev]')")

from conftest import small_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic deprecations
REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory):
    from ray import serve

    from flm_rt.serving.engine import EngineConfig
    from flm_rt.serving.ray_serve import RayOptions, build_app, describe
    from flm_rt.serving.server import ServeSettings

    path = tmp_path_factory.mktemp("ray") / NAME
    flm_rt.random_model(small_config(), seed=3, output_scale=6.0).save(path)
    port = free_port()
    t0 = time.monotonic()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, address="local", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = ServeSettings(model=str(path), device="cpu",
                                 engine=EngineConfig(max_batch=16, max_wait_ms=50, timeout_s=120))
        serve.run(build_app(settings, RayOptions(replicas=2), describe(settings)), name="flm_rt", route_prefix="/")
        print(f"ray cluster + 2 replicas up in {time.monotonic() - t0:.1f} s")
        yield f"http://127.0.0.1:{port}", flm_rt.load(path, device="cpu")
    finally:
        serve.shutdown()
        ray.shutdown()


def test_ray_serve_two_replicas_openai_client(ray_app):
    from ray import serve

    url, model = ray_app
    status = serve.status().applications["flm_rt"].deployments["FlmGenerator"]
    assert status.status == "HEALTHY" and status.replica_states.get("RUNNING") == 2
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]

    out = client.completions.create(model=NAME, prompt="", n=2, seed=4, extra_body={"steps": 2, "stochasticity": 0.5})
    ref = flm_rt.generate(model, num_samples=2, seed=4, steps=2, stochasticity=0.5)
    assert [c.text for c in out.choices] == ref.text
    assert [c.token_ids for c in out.choices] == ref.token_ids.tolist()

    def call(seed):
        return client.completions.create(model=NAME, prompt="", seed=seed, max_tokens=10).choices[0].token_ids
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        got = list(pool.map(call, range(12)))
    assert got == [flm_rt.generate(model, seed=s).token_ids[0, :10].tolist() for s in range(12)]

    with pytest.raises(openai.BadRequestError, match="generate unconditionally"):
        client.completions.create(model=NAME, prompt="Hello")
    chunks = list(client.completions.create(model=NAME, prompt="", seed=4, stream=True,
                                            extra_body={"steps": 2, "stochasticity": 0.5}))
    assert "".join(c.choices[0].text for c in chunks) == ref.text[0]
