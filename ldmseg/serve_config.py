"""Settings of the segmentation and inpainting endpoint (``ldmseg serve``): the ``serve`` section of a config."""

from __future__ import annotations

from dataclasses import dataclass

from ldmseg.typed import ConfigError


@dataclass
class ServeConfig:
    """How ``ldmseg serve`` batches, scales and guards requests (docs/serve.md)."""

    max_batch_size: int = 8
    """Segment requests a model replica samples together (``@serve.batch``)."""
    batch_wait_timeout_s: float = 0.05
    """How long a replica waits to fill a batch after its first request."""
    max_ongoing_requests: int = 16
    """Requests a model replica holds at once; must be >= ``max_batch_size`` (Serve's default, 5,
    would cap every batch at 5)."""
    max_queued_requests: int = 64
    """Requests waiting for a model replica beyond that; more are answered 503 with Retry-After."""
    min_replicas: int = 1
    max_replicas: int = 1
    """Model replicas: Serve's autoscaler keeps between ``min_replicas`` and ``max_replicas``."""
    target_ongoing_requests: float = 8.0
    """The autoscaler's target of ongoing requests per model replica."""
    num_cpus: float = 1.0
    """CPUs per model replica (its torch threads)."""
    num_gpus: float = 0.0
    """GPUs per model replica (1 on GPU clusters; the device is the one Ray assigns)."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress (it reads and checks requests; no model)."""
    max_request_bytes: int = 20_000_000
    """Larger request bodies are refused with 413 before they are read."""
    max_pixels: int = 40_000_000
    """Larger images are refused with 422 before decoding (decompression bombs)."""
    max_steps: int = 100
    """The most sampling steps a request may ask for."""
    max_samples: int = 8
    """The most samples per image a request may ask for (``samples``: stability scores)."""
    request_timeout_s: float = 120.0
    """A request still unanswered after this long gets 504 with a clear error body."""
    retry_after_s: int = 2
    """The ``Retry-After`` of a 503 when the model replicas are full."""

    def validate(self) -> None:
        for name in ("max_batch_size", "max_ongoing_requests", "max_queued_requests", "min_replicas",
                     "max_replicas", "ingress_replicas", "max_request_bytes", "max_pixels", "max_steps",
                     "max_samples", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ConfigError(f"serve.max_ongoing_requests ({self.max_ongoing_requests}) must be >= "
                              f"serve.max_batch_size ({self.max_batch_size}): a replica never batches more "
                              "requests than it holds; raise max_ongoing_requests")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"serve.max_replicas ({self.max_replicas}) must be >= serve.min_replicas "
                              f"({self.min_replicas})")
        if self.batch_wait_timeout_s < 0 or self.request_timeout_s <= 0 or self.target_ongoing_requests <= 0:
            raise ConfigError("serve.batch_wait_timeout_s must be >= 0, serve.request_timeout_s and "
                              "serve.target_ongoing_requests > 0")
        if self.num_gpus < 0 or self.num_cpus <= 0:
            raise ConfigError(f"serve.num_gpus must be >= 0 and serve.num_cpus > 0, got {self.num_gpus}, "
                              f"{self.num_cpus}")
