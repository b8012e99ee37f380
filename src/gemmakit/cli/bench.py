"""gemmakit bench: side-by-side speed against llama-cpp-python and transformers (and server / fine-tune loads)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..bench import inference as inference_bench
from ..bench.common import busy_core as busy


def bench(
    model: Annotated[str | None, typer.Option("--model", "-m", help="GGUF file (default: embedded)")] = None,
    repeats: Annotated[int, typer.Option(help="Alternating runs per engine; medians are reported.")] = 3,
    threads: Annotated[int | None, typer.Option(help="Threads for every engine (default: all cores).")] = None,
    engines: Annotated[str, typer.Option(help="Comma-separated subset of gemmakit,llama.cpp,transformers.")] = (
        "gemmakit,llama.cpp,transformers"),
    server: Annotated[bool, typer.Option("--server", help="Instead: aggregate tok/s of 1, 4, 8 server clients.")] = False,
    client: Annotated[str, typer.Option(help="--server: the clients' HTTP, http (the standard library) or openai "
                                             "(the official openai package, as an app would use)")] = "http",
    mixed: Annotated[bool, typer.Option("--mixed", help="--server: a queue of mixed requests (prompts of 16 to 400 "
                                                        "words, 32 to 128 new tokens) instead of equal ones.")] = False,
    finetune: Annotated[bool, typer.Option("--finetune", help="Instead: LoRA training vs transformers+PEFT "
                                                              "(fp32 and bf16).")] = False,
    structured: Annotated[bool, typer.Option("--structured", help="Instead: grammar-mask overhead on decode tok/s "
                                                                  "(batch 1 and 8), llguidance vs xgrammar.")] = False,
    watermark: Annotated[bool, typer.Option("--watermark", help="Instead: SynthID-Text separation of watermarked "
                                                                "and plain samples (AUC, TPR at 1% FPR).")] = False,
    samples: Annotated[int, typer.Option(help="--watermark: samples per side (64 tokens each).")] = 32,
    dtype: Annotated[str, typer.Option(help="--finetune: gemmakit's frozen-base dtype (auto, as gemmakit "
                                            "finetune: bfloat16 on AVX512-BF16/AMX CPUs).")] = "auto",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length for the prefill measurement.")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="Tokens decoded for the decode measurement.")] = 128,
    cflags: Annotated[str, typer.Option(help="Extra gcc flags for gemmakit's kernels, e.g. '-mno-avx512f' to measure "
                                             "the AVX2 path on an AVX-512 CPU (GEMMAKIT_CFLAGS).")] = "",
    llama_path: Annotated[str | None, typer.Option(help="Folder holding another llama-cpp-python build (its llama_cpp "
                                                        "package), e.g. one built without AVX-512.")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes for gemmakit's batched decode, e.g. 1,4,8 (1 is the "
                                            "decode column).")] = "1,4,8",
    busy_core: Annotated[bool, typer.Option("--busy-core", help="Keep one core busy with a spinning process for the "
                                                                "whole run (a laptop's editor or browser).")] = False,
    name: Annotated[str | None, typer.Option(help="Results file name (default <date>-<machine>).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON and markdown results.")] = Path("benchmarks/results"),
) -> None:
    """Measure decode/prefill tok/s, first-token latency, load time and peak RSS, each engine in its own process.

    Examples:  gemmakit bench                      # gemmakit vs llama.cpp vs transformers on the embedded GGUF
               gemmakit bench --engines gemmakit,llama.cpp --repeats 5
               gemmakit bench -m gemma-2b.Q4_K_M.gguf --prompt-tokens 256 --engines gemmakit,llama.cpp
               gemmakit bench --cflags=-mno-avx512f --llama-path peers/llama-avx2 --name avx2   # the AVX2 path
               gemmakit bench --busy-core          # the same with one core kept busy by another program
               gemmakit bench --server             # OpenAI server with 1, 4 and 8 concurrent clients
               gemmakit bench --server --client openai   # the same through the official openai client
               gemmakit bench --server --mixed     # a queue of requests of mixed lengths
               gemmakit bench --finetune           # LoRA steps vs transformers + PEFT, fp32 and bf16
               gemmakit bench --structured         # constrained decoding: mask overhead, engines compared
               gemmakit bench --watermark          # watermark detection: AUC and TPR at 1% FPR, 32 + 32 samples
    """
    batches = _batches(batch)
    console = Console()
    with (busy() if busy_core else nullcontext(None)) as busy_cpu, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
            transient=True) as bar:
        task = bar.add_task("starting")

        def step(label: str) -> None:
            bar.update(task, description=label)

        if server:
            from ..bench import server as server_bench

            step("server load test (1, 4, 8 clients)")
            result = server_bench.run_load_test(model, kernel_flags=cflags, repeats=repeats, client=client,
                                                workload="mixed" if mixed else "fixed")
            result["busy_core"] = busy_cpu
            _report(console, server_bench, result, out, name)
            return
        elif structured:
            from ..bench import structured as structured_bench

            step("constrained decoding: engines, then decode with and without masks")
            result = structured_bench.run(model, repeats=repeats)
            _report(console, structured_bench, result, out, name)
            return
        elif watermark:
            from ..bench import watermark as watermark_bench

            step(f"watermark: {samples} watermarked and {samples} plain samples, then detection")
            result = watermark_bench.run(model, samples=samples)
            _report(console, watermark_bench, result, out, name)
            return
        elif finetune:
            from ..bench import finetune as finetune_bench

            result = finetune_bench.run_finetune_bench(model, repeats=repeats, threads=threads, dtype=dtype,
                                                       on_step=lambda s: step(f"fine-tuning: {s}"))
            _report(console, finetune_bench, result, out, name)
            return
        else:
            result = inference_bench.run(model, engines=[e.strip() for e in engines.split(",") if e.strip()],
                                         repeats=repeats, threads=threads, prompt_tokens=prompt_tokens,
                                         decode_tokens=decode_tokens, kernel_flags=cflags, llama_path=llama_path,
                                         batches=batches, busy_cpu=busy_cpu, on_step=lambda s: step(f"running {s}"))
            _report(console, inference_bench, result, out, name)
            return


def _report(console: Console, bench_module: Any, result: dict, out: Path, name: str | None) -> None:
    """Save a benchmark's result (JSON + markdown, through its own save()) and print its table."""
    path = bench_module.save(result, out, name)
    console.print(Markdown(bench_module.markdown(result)))
    console.print(f"[dim]wrote {path} and {path.with_suffix('.md')}[/]")


def _batches(text: str) -> tuple[int, ...]:
    """--batch 1,4,8 -> (4, 8): the sizes above 1 (batch 1 is the decode measurement itself)."""
    try:
        sizes = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        sizes = [0]
    if not sizes or sizes[0] < 1 or sizes[-1] > 64:
        raise typer.BadParameter(f"{text!r}: give batch sizes from 1 to 64, comma-separated, e.g. --batch 1,4,8",
                                 param_hint="--batch")
    return tuple(b for b in sizes if b > 1)
