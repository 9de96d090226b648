"""Arguments of `fluxserve eval`, `fluxserve eval heads` and `fluxserve bench`.

`add_eval_parser` / `add_bench_parser` add the ``eval`` / ``bench`` commands to fluxserve's
command parser; `main` / `bench_main` run one alone (what ``fluxserve eval ...`` and
``fluxserve bench ...`` do, without importing vLLM or the server).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from evaluation.client import DEFAULT_URL

EVAL_HELP = "Long-context accuracy (RULER-style) of each policy, through the HTTP API."
EVAL_DESCRIPTION = """\
Runs RULER-style synthetic long-context tasks against an OpenAI-compatible server (fluxserve,
stock vLLM, ...) under each policy, with greedy decoding, and prints the accuracy per task x
length x policy. Writes results.jsonl (every finished item: rerun the same command to resume),
summary.csv, summary.json and PNG plots to --out. See docs/quality.md.

policy specs (space-separated):
  full | auto | sparse[:WINDOW] | layers:0-3,8 | streaming[:B] | snapkv[:B] | calidrop[:B]
  joined with '+' (e.g. sparse+snapkv:512); calidrop:256,512,1024 expands to one policy per
  budget B; 'all' = every policy at budgets 256-2048.
tasks: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe,
  local_pattern, local_copy; groups: all, ruler, niah, local.

`fluxserve eval heads CHECKPOINT` profiles the retrieval heads of a local checkpoint instead;
`fluxserve eval heads-ablate CHECKPOINT` measures them (heads forced sparse, protected from
eviction)."""


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be in (0, 86400] seconds, got {value}")
    return value


def _length(text: str) -> int:
    """A length in tokens: ``4096``, ``4K`` or ``128k``."""
    text = text.strip().lower()
    try:
        return int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length in tokens: {text!r}") from None


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server root URL (a trailing /v1 is fine); default {DEFAULT_URL}")
    parser.add_argument("--api-key", default=None,
                        help="bearer token; default $FLUXSERVE_API_KEY, else $OPENAI_API_KEY")
    parser.add_argument("--model", default=None,
                        help="served model name; default the server's first model")


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", dest="timeout_s", type=_seconds, default=600.0,
                        help="seconds per request; default 600")
    parser.add_argument("--max-retries", type=_bounded_int(0, 20), default=4,
                        help="retries on 429/502/503/504 and connection errors; default 4")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


def _add_tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="HF tokenizer directory or tokenizer.json for exact lengths; "
                             "default the server's POST /tokenize, else ~4 chars per token")


def _api_key_from_env(args: argparse.Namespace) -> None:
    if args.api_key is None:
        args.api_key = os.environ.get("FLUXSERVE_API_KEY") or os.environ.get("OPENAI_API_KEY")


def _exit_status(command: str, call: Callable[[], object],
                 errors: tuple[type[Exception], ...], interrupted: str) -> int:
    """Run a command's `call`; returns its exit status: 0 when it returns, 2 (after
    ``<command>: error: <message>`` on stderr) when it raises one of `errors`, 130 on Ctrl-C
    (after ``interrupted: <interrupted>``, what became of the work done)."""
    try:
        call()
    except errors as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    return 0


def _resumable(out: str) -> str:
    """What an interrupted command that keeps its finished items says about them."""
    return f"finished items are kept in {out}/results.jsonl; run the same command to resume"


def _run_alone(command: str, add_parser: Callable[..., argparse.ArgumentParser],
               run_parsed: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """``fluxserve <command> ...`` with `argv` the arguments after `command` (default
    ``sys.argv[1:]``), parsed by the sub-parser `add_parser` adds and run by `run_parsed`."""
    parser = argparse.ArgumentParser(prog="fluxserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return run_parsed(args)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.long_context import DEFAULT_LENGTHS

    _add_server_arguments(parser)
    parser.add_argument("--tasks", nargs="+", default=["all"], metavar="TASK",
                        help="tasks or groups (all, ruler, niah, local); default all")
    parser.add_argument("--lengths", nargs="+", type=_length, default=DEFAULT_LENGTHS,
                        metavar="TOKENS",
                        help="target lengths in tokens (4096, 4K, 128K; 256 to 1M); default "
                             "RULER's 4K-128K (lengths above the model's context are skipped)")
    parser.add_argument("--policies", nargs="+", default=["all"], metavar="SPEC",
                        help="policy specs (see below); default all (only `full` runs on a "
                             "server without fluxserve's fields)")
    parser.add_argument("--samples", type=_bounded_int(1, 100_000), default=20,
                        help="samples per task and length (RULER uses 500); default 20")
    parser.add_argument("--seed", type=int, default=42, help="generation seed; default 42")
    parser.add_argument("--concurrency", type=_bounded_int(1, 1024), default=4,
                        help="requests in flight at once; default 4")
    parser.add_argument("--api", choices=["auto", "chat", "completions"], default="auto",
                        help="chat (the answer prefix pre-filled as the assistant turn where "
                             "the server allows) or completions (RULER's plain template); "
                             "auto: chat when the server accepts it")
    _add_tokenizer_argument(parser)
    parser.add_argument("--out", default="fluxserve-eval",
                        help="output folder (reused to resume); default ./fluxserve-eval")
    _add_client_arguments(parser)


# `fluxserve eval heads` defaults (also the profile `heads-ablate` makes without --heads).
HEADS_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_2"]
HEADS_LENGTHS = [2048]
HEADS_SAMPLES = 4


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=42, help="sample seed; default 42")
    parser.add_argument("--device", default="cpu", help="torch device; default cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def add_heads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="local Hugging Face checkpoint directory")
    parser.add_argument("--tasks", nargs="+", default=HEADS_TASKS, metavar="TASK",
                        help=f"needle tasks to average over; default {', '.join(HEADS_TASKS)}")
    parser.add_argument("--lengths", nargs="+", type=_length, default=HEADS_LENGTHS,
                        metavar="TOKENS", help="prompt lengths in tokens; default "
                        f"{' '.join(map(str, HEADS_LENGTHS))}")
    parser.add_argument("--samples", type=_bounded_int(1, 10_000), default=HEADS_SAMPLES,
                        help=f"samples per task and length; default {HEADS_SAMPLES}")
    _add_model_arguments(parser)
    parser.add_argument("--top", type=_bounded_int(1, 1 << 20), default=20,
                        help="heads printed (all are written); default 20")
    parser.add_argument("--out", default="fluxserve-heads",
                        help="output folder; default ./fluxserve-heads")


# `fluxserve eval heads-ablate` defaults (evaluation.head_ablation.AblateConfig uses them too).
ABLATE_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1", "local_copy"]
ABLATE_LENGTHS = [4096, 8192]
ABLATE_BUDGETS = [64, 128, 256, 512, 1024]
ABLATE_SAMPLES = 4
ABLATE_DRAWS = 3


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 50:
        raise argparse.ArgumentTypeError(f"must be in (0, 50] percent, got {value:g}")
    return value


ABLATE_DESCRIPTION = """\
Offline, in Hugging Face transformers (no server): greedy generation on the eval tasks (the
prompts of `fluxserve eval`, RULER's metric) under per-head attention masks.

experiments:
  force  accuracy with nothing forced, with the top P % of heads by retrieval score (from
         --heads, a `fluxserve eval heads` report, else profiled first) forced to sink + window
         attention, and with a random P % of the other heads forced (--random-draws draws,
         averaged)
  evict  a simulation of SnapKV eviction (the served policy's selection, applied as a mask on
         the decode queries) at each --budgets B: every KV head keeps B (snapkv); the KV heads
         of the top heads keep the whole prompt (protect); the same with the other heads' budget
         lowered to keep the total KV equal (protect-equal)

Writes results.jsonl (every finished item: rerun the same command to resume), force.csv,
evict.csv, summary.json, force.png and evict.png to --out. See docs/quality.md."""


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="local Hugging Face checkpoint directory")
    parser.add_argument("--heads", default=None, metavar="HEADS_JSON",
                        help="heads.json of `fluxserve eval heads` for this checkpoint; default: "
                             "profile now with that command's defaults")
    parser.add_argument("--experiments", nargs="+", choices=["force", "evict"],
                        default=["force", "evict"], help="default both")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", default=ABLATE_TASKS,
                        help="eval tasks or groups (as `fluxserve eval`); default "
                             f"{' '.join(ABLATE_TASKS)}")
    parser.add_argument("--lengths", nargs="+", type=_length, default=ABLATE_LENGTHS,
                        metavar="TOKENS", help="target lengths in tokens (256 to 1M; those above "
                        "the model's context are skipped); default "
                        f"{' '.join(map(str, ABLATE_LENGTHS))}")
    parser.add_argument("--samples", type=_bounded_int(1, 10_000), default=ABLATE_SAMPLES,
                        help=f"samples per task and length; default {ABLATE_SAMPLES}")
    parser.add_argument("--top-percent", type=_percent, default=5.0, metavar="P",
                        help="percent of all query heads forced or protected, rounded, at least "
                             "one head; (0, 50]; default 5")
    parser.add_argument("--random-draws", type=_bounded_int(1, 100), default=ABLATE_DRAWS,
                        help=f"random head sets, each run on every sample; default {ABLATE_DRAWS}")
    parser.add_argument("--sink", type=_bounded_int(0, 1 << 20), default=None,
                        help="sink tokens of a forced head; default Flux's (128)")
    parser.add_argument("--window", type=_bounded_int(1, 1 << 20), default=None,
                        help="window of a forced head, its own position included; default "
                             "Flux's (2048)")
    parser.add_argument("--budgets", nargs="+", type=_bounded_int(2, 1 << 20),
                        default=ABLATE_BUDGETS, metavar="B",
                        help="KV tokens per head (evict; each above --obs-window); default "
                             f"{' '.join(map(str, ABLATE_BUDGETS))}")
    parser.add_argument("--protected-budget", type=_bounded_int(2, 1 << 20), default=None,
                        metavar="B", help="KV tokens a protected KV head keeps (evict); default "
                                          "the whole prompt")
    parser.add_argument("--obs-window", type=_bounded_int(1, 4096), default=None,
                        help="SnapKV observation window (last prompt queries, always kept); "
                             "default snapkv's (32)")
    parser.add_argument("--pool-kernel", type=_bounded_int(1, 63), default=None,
                        help="SnapKV max-pool kernel (odd); default snapkv's (7)")
    parser.add_argument("--api", choices=["auto", "chat", "completions"], default="auto",
                        help="chat template with the answer prefix pre-filled, or the plain "
                             "completions prompt; auto: chat when the tokenizer has a template")
    parser.add_argument("--max-new-tokens", type=_bounded_int(1, 4096), default=None,
                        help="cap on generated tokens; default each task's output tokens")
    _add_model_arguments(parser)
    parser.add_argument("--out", default="fluxserve-heads-ablate",
                        help="output folder (reused to resume); default ./fluxserve-heads-ablate")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` (and its ``heads`` sub-command) to an argparse sub-parser group."""
    parser = subparsers.add_parser("eval", help=EVAL_HELP, description=EVAL_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_arguments(parser)
    sub = parser.add_subparsers(dest="eval_command", metavar="{heads,heads-ablate}")
    heads = sub.add_parser(
        "heads", help="retrieval-attention profile of a local checkpoint (HF transformers)",
        description="Per (layer, head), the attention mass that the answer tokens' queries put "
                    "on the needle span, averaged over generated needle tasks. Writes heads.json "
                    "(ranked) and heads.png (heat map).")
    add_heads_arguments(heads)
    ablate = sub.add_parser(
        "heads-ablate", help="accuracy with retrieval heads forced sparse or protected from "
                             "eviction (offline, HF transformers)",
        description=ABLATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ablate_arguments(ablate)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``eval`` command; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if getattr(args, "eval_command", None) == "heads":
        from evaluation.heads import profile_from_args

        profile_from_args(args)
        return 0
    if getattr(args, "eval_command", None) == "heads-ablate":
        from evaluation.head_ablation import ablate_from_args

        return _exit_status("fluxserve eval heads-ablate", lambda: ablate_from_args(args),
                            (ValueError, OSError), _resumable(args.out))

    from evaluation.long_context import EvalError, config_from_args
    from evaluation.long_context import run as run_eval

    _api_key_from_env(args)
    return _exit_status("fluxserve eval", lambda: run_eval(config_from_args(args)),
                        (EvalError, ValueError), _resumable(args.out))


def main(argv: list[str] | None = None) -> int:
    """``fluxserve eval ...`` with `argv` the arguments after ``eval``."""
    return _run_alone("eval", add_eval_parser, run, argv)


BENCH_HELP = "Serving latency (TTFT, TPOT) of each policy across context lengths, with speedups."
BENCH_DESCRIPTION = """\
Sweeps context lengths x policies against a running OpenAI-compatible server with streamed
completions, and prints per (length, policy) the time to first token (TTFT) and time per output
token (TPOT), p50 and p95 in milliseconds, and the speedup over the dense baseline `full`
(baseline p50 / policy p50 at the same length), measured in the same run: the baseline always
runs, interleaved round by round with the other policies. Every request has its own prompt of
exactly the length asked (token ids from the server's tokenizer: no prefix-cache hits) and
generates exactly --output-tokens tokens (ignore_eos). Writes requests.csv, summary.csv,
summary.json, ttft_vs_length.png, tpot_vs_length.png and speedup.png to --out. See
docs/benchmarks.md.

policy specs (space-separated), as in `fluxserve eval`:
  full | auto | sparse[:WINDOW] | layers:0-3,8 | streaming[:B] | snapkv[:B] | calidrop[:B]
  joined with '+' (e.g. sparse+snapkv:512); calidrop:256,512,1024 expands to one policy per
  budget B; 'all' = every policy at budgets 256-2048."""


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from evaluation.bench import DEFAULT_LENGTHS, DEFAULT_POLICIES

    _add_server_arguments(parser)
    parser.add_argument("--lengths", nargs="+", type=_length, default=DEFAULT_LENGTHS,
                        metavar="TOKENS",
                        help="prompt lengths in tokens (4096, 4K, 128K; 16 to 1M); default "
                             "4K 16K 32K 64K 128K (lengths that do not fit the model's context "
                             "with the output tokens are skipped)")
    parser.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES, metavar="SPEC",
                        help="policy specs (see below); `full`, the baseline, always runs; "
                             f"default {' '.join(DEFAULT_POLICIES)}")
    parser.add_argument("--output-tokens", type=_bounded_int(1, 1 << 16), default=128,
                        help="tokens each request generates; default 128")
    parser.add_argument("--concurrency", type=_bounded_int(1, 1024), default=1,
                        help="simultaneous streams per (length, policy) round; default 1")
    parser.add_argument("--repeats", type=_bounded_int(1, 10_000), default=3,
                        help="measured rounds per (length, policy); default 3")
    parser.add_argument("--warmup", type=_bounded_int(0, 100), default=1,
                        help="warm-up rounds per (length, policy), not measured; default 1")
    parser.add_argument("--seed", type=int, default=0, help="prompt seed; default 0")
    _add_tokenizer_argument(parser)
    parser.add_argument("--out", default="fluxserve-bench",
                        help="output folder (its files are replaced); default ./fluxserve-bench")
    _add_client_arguments(parser)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` to an argparse sub-parser group."""
    parser = subparsers.add_parser("bench", help=BENCH_HELP, description=BENCH_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run a parsed ``bench`` command; returns the exit status."""
    from evaluation.bench import BenchError, config_from_args
    from evaluation.bench import run as run_sweep

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _api_key_from_env(args)
    return _exit_status("fluxserve bench", lambda: run_sweep(config_from_args(args)),
                        (BenchError, ValueError), "nothing written")


def bench_main(argv: list[str] | None = None) -> int:
    """``fluxserve bench ...`` with `argv` the arguments after ``bench``."""
    return _run_alone("bench", add_bench_parser, run_bench, argv)
