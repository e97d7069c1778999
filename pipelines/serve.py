"""A segmentation and inpainting endpoint on Ray Serve: ``ldmseg serve``.

    ldmseg serve --model runs/quickstart/models/ldm            # then open http://127.0.0.1:8000/
    ldmseg serve --model models:/ldmseg-ldm@current --config conf/serve.yaml --host 0.0.0.0
    serve run infra/serve/ldmseg.yaml                          # the same app from a Serve config file

Two deployments: the HTTP ingress (FastAPI, :mod:`pipelines.serve_api`: reads and checks every
request, decodes images, encodes answers) and the model (:mod:`pipelines.serve_model`: the model
loaded once per replica, segment requests batched with ``@serve.batch``, autoscaled between
``serve.min_replicas`` and ``serve.max_replicas``). Settings: the ``serve`` section of a config
(``ldmseg/serve_config.py``, docs/serve.md). Blocks until Ctrl-C, then shuts Serve down.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ldmseg.logs import get_logger

log = get_logger("serve")

APP_NAME = "ldmseg"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model folder written by 'ldmseg train ldm' (local or s3://), or models:/NAME@ALIAS "
                             "(pinned to its version when the server starts)")
    parser.add_argument("--config", default=None,
                        help="YAML file (or shipped config name) whose 'serve' and 'sampling' sections apply, "
                             "e.g. conf/serve.yaml")
    parser.add_argument("--sampling", default=None,
                        help="a named sampling config or YAML file (as 'ldmseg evaluate --sampling'): the served "
                             "defaults; requests may still pick sampler and steps")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s; 0.0.0.0 to listen "
                                                             "on every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="serve.* and sampling.* overrides, e.g. serve.max_batch_size=8 sampling.steps=10")


def build_app(model: str, *, config: str | None = None, overrides: list[str] | None = None,
              sampling: dict | None = None, tracking_uri: str | None = None):
    """The Serve application (ingress bound to the model deployment) and its ``/v1/model`` info."""
    from ray import serve

    from ldmseg.checkpoint import model_config
    from ldmseg.config import config_hash, to_dict, with_sampling
    from ldmseg.diffusion.sampling import SAMPLERS
    from pipelines.segment import job_config, model_meta
    from pipelines.serve_api import MODEL_DEPLOYMENT, make_app
    from pipelines.serve_model import ModelServer
    from pipelines.tracking import pin_model_uri

    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # the replicas' own may differ
    pinned, version = pin_model_uri(model, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="ldmseg-serve-") as tmp:
        meta = model_meta(pinned, Path(tmp), tracking_uri)
        cfg = job_config(model_config(tmp, meta), config, overrides or [], ("serve", "sampling"), "serve")
    cfg = with_sampling(cfg, sampling or {})
    s = cfg.serve
    info = {"model": model, "model_loaded": pinned, "model_version": version, "model_step": meta.get("step"),
            "config_hash": config_hash(cfg, ["sampling", "serve"]), "resolution": cfg.data.resolution,
            "samplers": sorted(SAMPLERS), "sampling": to_dict(cfg.sampling),
            "limits": {"max_request_bytes": s.max_request_bytes, "max_pixels": s.max_pixels, "max_steps": s.max_steps,
                       "max_samples": s.max_samples, "request_timeout_s": s.request_timeout_s,
                       "max_batch_size": s.max_batch_size}}
    model_deployment = serve.deployment(
        ModelServer, name=MODEL_DEPLOYMENT, max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus})
    fastapi_app = make_app(s, info)

    @serve.deployment(name="Ingress", num_replicas=s.ingress_replicas, max_ongoing_requests=1000,
                      ray_actor_options={"num_cpus": 0})
    @serve.ingress(fastapi_app)
    class Ingress:
        def __init__(self, model_handle):
            self.model_handle = model_handle  # bound so that Serve deploys the model with the ingress

    bound = Ingress.bind(model_deployment.bind(pinned, to_dict(cfg.sampling), s.max_batch_size,
                                               s.batch_wait_timeout_s, tracking_uri))
    return bound, info


def cluster_check(model_loaded: str, tracking_uri: str | None, nodes: int) -> None:
    """On a cluster of several nodes, the model the replicas load (``model_loaded``: an absolute
    folder, an ``s3://`` prefix or a pinned ``models:/`` URI) must be reachable from every node,
    and for a ``models:/`` URI the MLflow tracking URI too (:mod:`pipelines.cluster_paths`)."""
    from pipelines.cluster_paths import model_uri_users, require_reachable

    paths = {"--model": model_loaded}
    require_reachable(paths, nodes, tracking_uri=tracking_uri,
                      tracking_users=model_uri_users(paths, "the model replicas (they load --model from MLflow)"))


def app_builder(args: dict[str, Any]):
    """``import_path: pipelines.serve:app_builder`` of a Serve config file; ``args``: ``model``
    (required), ``config``, ``overrides`` (list of key=value), ``tracking_uri``. Where Ray is
    already initialised (a config file's app is built on the cluster) the model's reach is
    checked (:func:`cluster_check`)."""
    import ray

    if not args.get("model"):
        raise ValueError("the Serve config's args need 'model': a model folder, s3:// prefix or models:/NAME@ALIAS")
    app, info = build_app(str(args["model"]), config=args.get("config"), overrides=list(args.get("overrides") or []),
                          tracking_uri=args.get("tracking_uri"))
    if ray.is_initialized():
        from pipelines.cluster_paths import alive_node_count

        cluster_check(info["model_loaded"], args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
                      alive_node_count())
    return app


def start(model: str, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME, route_prefix: str = "/",
          built: tuple | None = None, **kwargs) -> dict:
    """Build the app (or take ``built``, a :func:`build_app` result) and run it on Serve (Ray must be
    initialised) as application ``name`` under ``route_prefix``; → its info. Returns when ready.
    Serve's HTTP host and port are set by the first call in a Ray session."""
    from ray import serve

    app, info = built or build_app(model, **kwargs)
    serve.start(http_options={"host": host, "port": port})
    t0 = time.time()
    serve.run(app, name=name, route_prefix=route_prefix)
    log.info(f"serving {model} at http://{host}:{port}/ (ready in {time.time() - t0:.1f} s; API docs at /docs)")
    return info


def check_inputs(args: argparse.Namespace) -> dict:
    """Everything checkable before Ray starts → the ``--sampling`` options."""
    from ldmseg import inputs

    sampling = inputs.sampling_preset(args.sampling)
    inputs.model("--model", args.model)
    if not 0 < args.port < 65536:
        raise inputs.InputError(f"--port {args.port}: not a TCP port (1-65535)")
    return sampling


def run(args: argparse.Namespace) -> int:
    from ray import serve

    from pipelines import ray_compat
    from pipelines.cluster_paths import alive_node_count

    sampling = check_inputs(args)
    # building the app reads the model's config and checks the overrides: before Ray starts
    built = build_app(args.model, config=args.config, overrides=args.overrides, sampling=sampling,
                      tracking_uri=args.tracking_uri)
    ray_compat.init_ray(args.address)
    cluster_check(built[1]["model_loaded"], args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                  alive_node_count())
    info = start(args.model, host=args.host, port=args.port, built=built)
    print(json.dumps({"url": f"http://{args.host}:{args.port}/", **info}), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        serve.shutdown()
    return 0
