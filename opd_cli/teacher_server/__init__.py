"""A teacher scored by vLLM (`teacher.backend=vllm`): in this process, or over HTTP against vLLM's
OpenAI-compatible server started by `opd teacher serve`.

    opd teacher serve experiment=qwen3_opd_8b_topk teacher.tensor_parallel_size=4   # prints teacher server: http://127.0.0.1:8000
    opd run experiment=qwen3_opd_8b_topk loss.support=intersection teacher.backend=vllm teacher.server=http://127.0.0.1:8000
    opd run teacher.backend=vllm loss=topk_rkl_stopgrad loss.support=intersection trainer.steps=20   # testbed, vLLM in process

Modules: `checks` (what a top-K teacher can serve, refused at compose time), `client` (the HTTP pool:
retries, backoff, timeouts), `scorer` (prompt log-probs -> `TeacherLogprobs`, in process or served),
`serve` (the `opd teacher serve` command).
"""
