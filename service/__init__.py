"""Recommendations API: serves the pipeline's Delta tables from memory over HTTP (FastAPI + delta-rs).

`service.settings` (environment variables), `service.store` (Delta -> compact in-memory snapshot,
background reload), `service.app` (the HTTP endpoints), `python -m service` / `service/serve.sh`
(the start command).
"""
