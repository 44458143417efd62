"""Serving flm_rt models: an OpenAI-compatible HTTP API with dynamic batching (``flm-rt serve``).

* ``engine``: the batching engine, independent of HTTP (``Job``, ``run_batch``, ``BatchingEngine``);
* ``app``: the FastAPI app (request checking, OpenAI formats, streaming, limits, metrics);
* ``server``: ``flm-rt serve`` on uvicorn; ``ray_serve``: the same engine as Ray Serve deployments.

Needs the ``serve`` extra: ``pip install flm_rt[serve]``.
"""
