"""The offline API: ``LLM(model=...).generate(prompts, SamplingParams(...))`` and ``.chat(...)``."""

from __future__ import annotations

from typing import Sequence

from csps.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from csps.core.sampling_params import SamplingParams
from csps.engine.outputs import RequestOutput


def make_engine_config(
    model: str = "smollm2",
    device: str = "auto",
    dtype: str = "auto",
    token_budget: int | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int = 256,
    block_size: int = 16,
    num_blocks: int | None = None,
    kv_cache_bytes: int | None = None,
    enable_prefix_caching: bool = True,
    schedule_policy: str = "stall-free",
    adaptive_chunking: bool = True,
    step_time_budget_ms: float | None = None,
    sp: int = 1,
    tp: int = 1,
    sp_attn: str = "ring",
    sp_exchange: str = "auto",
    sp_threshold_tokens: int = 4096,
    seed: int = 0,
    max_waiting: int = 1024,
) -> EngineConfig:
    if token_budget is None:  # by the device: csps.device.default_token_budget
        from csps.device import default_token_budget, resolve_device

        token_budget = default_token_budget(resolve_device(device))
    return EngineConfig(
        model=model,
        device=device,
        dtype=dtype,
        seed=seed,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, kv_cache_bytes=kv_cache_bytes,
                          enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(token_budget=token_budget, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len or 1, policy=schedule_policy,
                                  max_waiting=max_waiting, adaptive_chunking=adaptive_chunking,
                                  step_time_budget_ms=step_time_budget_ms),
        parallel=ParallelConfig(sp=sp, tp=tp, sp_attn=sp_attn, sp_exchange=sp_exchange,
                                sp_threshold_tokens=sp_threshold_tokens),
    )


def create_engine(config: EngineConfig, max_model_len: int | None = None, **kw):
    """Build the engine for a config (this process is rank 0 of its SP × TP world). Under torchrun,
    ranks 1..W-1 serve rank 0's plans here and exit instead."""
    from dataclasses import replace

    from csps.dtypes import torch_dtype
    from csps.engine.engine import Engine
    from csps.engine.rank_world import (
        check_devices,
        check_layout,
        is_torchrun_worker,
        refuse_if_ranks_running,
        under_torchrun,
    )
    from csps.engine.weights import load_model_weights

    check_devices(config)  # at once, before minutes of loading weights
    if config.parallel.world_size > 1 and not under_torchrun():
        refuse_if_ranks_running()
    weights = kw.pop("weights", None) or load_model_weights(config.model, torch_dtype(config.dtype),
                                                            seed=config.seed)
    model_cfg = weights[0]
    limit = max_model_len or model_cfg.max_position_embeddings
    config = replace(config, scheduler=replace(config.scheduler, max_model_len=limit))
    if config.parallel.world_size > 1 and is_torchrun_worker():
        from csps.engine.engine import kv_pool_blocks
        from csps.engine.rank_runtime import torchrun_worker_main

        check_layout(config, model_cfg)
        torchrun_worker_main(config, weights, kv_pool_blocks(config, model_cfg))  # exits the process
    return Engine(config, weights=weights, **kw)


class LLM:
    def __init__(self, model: str = "smollm2", *, max_model_len: int | None = None, **kw) -> None:
        self.config = make_engine_config(model=model, max_model_len=max_model_len, **kw)
        self.engine = create_engine(self.config, max_model_len=max_model_len)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One finished output per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm or len(ids) < 2)
        try:
            while len(done) < len(ids):
                for o in self.engine.step():
                    if o.finished:
                        done[o.request_id] = o
                        bar.update(1)
                if not self.engine.has_unfinished() and len(done) < len(ids):
                    raise RuntimeError("engine went idle with unfinished requests")
        except BaseException:
            for i in ids:
                if i not in done:
                    self.engine.abort(i)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
