"""The API server's side of LoRA: an adapter the engine would refuse is a 400, not a 500.

vLLM's ``/v1/load_lora_adapter`` (and ``--lora-modules`` at start-up, which goes through the
same handler) sends the adapter to the engine's ``add_lora``; when the engine refuses it, vLLM
answers 500 ``InternalServerError`` with the reason, although the reason is the request's (a
rank above ``--max-lora-rank``, an adapter trained for another base model, unsupported PEFT
features). The plugin asks the worker first (``check_lora_adapter``: vLLM's own loading checks
plus the shape check against this model, nothing registered) and answers 400
``BadRequestError`` with the same reason; everything else, the adapter's not-found 404 and a
successful load included, stays vLLM's handler. The engine keeps serving either way.

The wrap is installed in the API server process only (``TpuPluginPlatform``), once.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)


def install() -> None:
    """Wraps ``OpenAIServingModels.load_lora_adapter`` (idempotent)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    original = OpenAIServingModels.load_lora_adapter
    if getattr(original, "_tpu_plugin", False):
        return

    async def load_lora_adapter(
        self: OpenAIServingModels, request: Any, base_model_name: str | None = None
    ) -> Any:
        problem = await engine_verdict(self, request)
        if problem is not None:
            from vllm.entrypoints.serve.exception_handling.error_response import (
                create_error_response,
            )

            logger.info("refused LoRA adapter %r: %s", request.lora_name, problem)
            return create_error_response(
                message=problem, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
            )
        return await original(self, request, base_model_name)

    load_lora_adapter._tpu_plugin = True  # type: ignore[attr-defined]
    OpenAIServingModels.load_lora_adapter = load_lora_adapter  # type: ignore[method-assign]


async def engine_verdict(models: Any, request: Any) -> str | None:
    """The worker's reason to refuse the adapter of ``request``, or None (also when the
    request is malformed or the check itself fails: vLLM's handler then answers as always)."""
    if not request.lora_name or not request.lora_path or models.is_base_model(request.lora_name):
        return None
    known = models.lora_requests.get(request.lora_name)
    lora_id = known.lora_int_id if known is not None else 1  # the id is not used by the check
    args = (request.lora_name, lora_id, request.lora_path)  # plain fields survive the RPC
    try:
        verdicts = await models.engine_client.collective_rpc("check_lora_adapter", args=args)
    except Exception as error:  # noqa: BLE001 (engine trouble: vLLM's handler reports it)
        logger.warning("LoRA adapter check of %r failed: %s", request.lora_name, error)
        return None
    return next((v for v in verdicts if v), None)
