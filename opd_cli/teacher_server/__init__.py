"""A teacher scored by vLLM (`teacher.backend=vllm`): in this process, or over HTTP against vLLM's
OpenAI-compatible server started by `opd teacher serve`.

    opd teacher serve                                        # terminal 1: prints the URL to pass
    opd run teacher.backend=vllm teacher.server=http://127.0.0.1:8000 loss=topk_rkl_stopgrad loss.support=intersection
    opd run teacher.backend=vllm loss=topk_rkl_stopgrad loss.support=intersection   # vLLM in this process

Modules: `checks` (what a top-K teacher can serve, refused at compose time), `client` (the HTTP pool:
retries, backoff, timeouts), `scorer` (prompt log-probs -> `TeacherLogprobs`, in process or served),
`serve` (the `opd teacher serve` command).
"""
