"""Run one vLLM engine in a fresh process for the Flux tests (stock vLLM without our plugin,
or tensor parallelism): ``python engine_job.py JOB.json OUT.json``.

JOB: {"model": dir, "engine": {LLM kwargs}, "requests": [{"prompt": [ids], "extra_args": {...}
or null, "max_tokens": n}]}. Each request runs alone (so the routing of ``auto`` requests sees
the same first chunk as in the in-process engine). OUT: {"tokens": [[ids], ...]}.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], **job["engine"])
    tokens = []
    for r in job["requests"]:
        sp = SamplingParams(max_tokens=r["max_tokens"], temperature=0.0,
                            extra_args=r.get("extra_args"))
        out = llm.generate([{"prompt_token_ids": r["prompt"]}], sp, use_tqdm=False)
        tokens.append(list(out[0].outputs[0].token_ids))
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": tokens}, f)


if __name__ == "__main__":
    main()
