"""Server settings: flags of ``tunelab server``, or a YAML file (``--config platform.yaml``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from tunelab.config import Strict

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class PlatformSettings(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tls_certfile: Optional[str] = Field(None, description="serve HTTPS with this certificate (PEM); boto3's bearer-token "
                                                        "auth sends its token only over HTTPS")
    tls_keyfile: Optional[str] = Field(None, description="the certificate's private key (PEM)")
    max_upload_bytes: int = Field(512 * 2 ** 20, ge=1, description="largest file accepted by POST /v1/files")
    worker: bool = Field(True, description="run a worker in the server process (off: an API-only server)")
    concurrency: int = Field(1, ge=1, description="jobs run at once by this server's worker")
    lease_s: float = Field(30.0, gt=0, description="a job's lease; a worker that stops renewing it loses the job")
    poll_s: float = Field(0.5, gt=0, description="how often the worker looks for jobs and checks its own")
    cancel_grace_s: float = Field(120.0, ge=0, description="after a cancel, SIGTERM a job still running this late")
    executor: Literal["local", "ray"] = "local"
    ray_address: Optional[str] = Field(None, description="Ray dashboard address (http://HEAD:8265) for executor ray")
    ray_num_cpus: Optional[float] = None
    ray_num_gpus: Optional[float] = None
    recipe_defaults: dict[str, dict] = Field(
        default_factory=dict, description="per recipe name (sft, dpo, cpt, distill): fields under every recipe the "
                                          "OpenAI and Bedrock endpoints build, e.g. {sft: {data: {max_length: 1024}}}")
    max_tokens: int = Field(512, ge=1, description="inference: most completion tokens per request")
    max_batch_size: int = Field(8, ge=1, description="inference: requests decoded together")
    threads: Optional[int] = Field(None, ge=1, description="inference: torch CPU threads")
