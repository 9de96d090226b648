"""`fluxserve eval` and `fluxserve bench` on the command line, and the package's independence
from the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_eval_is_a_fluxserve_command_with_defaults():
    args = build_parser().parse_args(["eval"])
    assert args.command == "eval" and args.eval_command is None
    assert args.url == "http://127.0.0.1:8000"
    assert args.policies == ["all"] and args.tasks == ["all"]
    assert args.lengths == [4096, 8192, 16384, 32768, 65536, 131072]
    args = build_parser().parse_args(["eval", "--lengths", "1K", "2048", "--policies", "full",
                                      "sparse+snapkv:512"])
    assert args.lengths == [1024, 2048] and args.policies == ["full", "sparse+snapkv:512"]
    heads = build_parser().parse_args(["eval", "heads", "/ckpt", "--lengths", "4k"])
    assert (heads.eval_command, heads.checkpoint, heads.lengths) == ("heads", "/ckpt", [4096])


def test_bench_is_a_fluxserve_command_with_defaults():
    args = build_parser().parse_args(["bench"])
    assert args.command == "bench" and args.url == "http://127.0.0.1:8000"
    assert args.lengths == [4096, 16384, 32768, 65536, 131072]
    assert args.policies == ["full", "sparse", "calidrop:2048"]
    assert (args.output_tokens, args.concurrency, args.repeats, args.warmup) == (128, 1, 3, 1)
    assert args.out == "fluxserve-bench" and args.progress
    args = build_parser().parse_args(["bench", "--lengths", "256", "1K", "--policies",
                                      "sparse+snapkv:512", "--output-tokens", "4",
                                      "--concurrency", "8", "--repeats", "2", "--warmup", "0",
                                      "--out", "x", "--no-progress"])
    assert args.lengths == [256, 1024] and args.policies == ["sparse+snapkv:512"]
    assert (args.output_tokens, args.concurrency, args.repeats, args.warmup) == (4, 8, 2, 0)
    assert (args.out, args.progress) == ("x", False)


def test_evaluation_imports_neither_vllm_nor_the_server():
    code = ("import sys, evaluation.cli, evaluation.long_context, evaluation.heads, "
            "evaluation.bench, evaluation.head_masks, evaluation.head_ablation\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'vllm', 'server', 'attention_backends', 'kv_policies'})\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_bad_arguments_exit_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "eval", "--policies", "fast",
                           "--url", "http://127.0.0.1:9", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown part 'fast'" in proc.stderr


def test_bench_bad_arguments_exit_with_a_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--policies", "fast",
                           "--url", "http://127.0.0.1:9", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "fluxserve bench: error:" in proc.stderr
    assert "unknown part 'fast'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "server.cli", "bench", "--concurrency", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "must be in [1, 1024]" in proc.stderr
