"""Embeddings per second at EmbeddingGemma 300M widths (random weights): gemmakit vs sentence-transformers (fp32)
vs llama.cpp's embedding mode (llama-cpp-python), same threads, one process, alternating runs.

The model is EmbeddingGemma-300m's shape (google/embeddinggemma-300m config.json: 24 layers, hidden 768, MLP 1152,
3 query heads and 1 KV head of 256, sliding window 512, vocabulary 262144) with random weights, saved as a
sentence-transformers folder, and converted to a float32 gemma-embedding GGUF for llama.cpp.
Run: python -m gemmakit.bench.embeddings [--repeats 3] [--threads 2] [--texts 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .common import Pauses, isa, machine, peak_rss_mb, write_results

DTYPES = {"gemmakit": "fp32", "gemmakit-bf16": "bf16", "sentence-transformers": "fp32", "llama.cpp": "f32 GGUF"}
SHAPE = dict(vocab_size=262144, hidden_size=768, intermediate_size=1152, num_hidden_layers=24, num_attention_heads=3,
             num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
             max_position_embeddings=2048, use_bidirectional_attention=True)


def build_folder(folder: Path, tokenizer_dir: Path) -> Path:
    """A random EmbeddingGemma-300m-shaped sentence-transformers folder (Dense 768 -> 3072 -> 768)."""
    import json
    import shutil

    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**SHAPE)).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer_dir / name).exists():
            shutil.copyfile(tokenizer_dir / name, folder / name)
    mods = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense"), ("3_Dense", "Dense"),
            ("4_Normalize", "Normalize")]
    (folder / "modules.json").write_text(json.dumps([{"idx": i, "name": str(i), "path": p,
                                                      "type": f"sentence_transformers.models.{t}"}
                                                     for i, (p, t) in enumerate(mods)]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True, "include_prompt": True}))
    for sub, (n_in, n_out) in (("2_Dense", (768, 3072)), ("3_Dense", (3072, 768))):
        (folder / sub).mkdir()
        (folder / sub / "config.json").write_text(json.dumps({"in_features": n_in, "out_features": n_out,
                                                              "bias": False, "activation_function":
                                                              "torch.nn.modules.linear.Identity"}))
        save_file({"linear.weight": torch.randn(n_out, n_in) * n_in**-0.5}, str(folder / sub / "model.safetensors"))
    (folder / "4_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 2048}))
    return folder


def texts(n: int) -> list[str]:
    """n passages of 20 to ~250 words cut from the benchmark text (retrieval-sized chunks of mixed length)."""
    words = (Path(__file__).with_name("bench_text.txt").read_text(encoding="utf-8").split() * 50)
    rng = np.random.default_rng(0)
    out, at = [], 0
    for _ in range(n):
        k = int(rng.integers(20, 250))
        out.append(" ".join(words[at: at + k]))
        at += k
    return out


def timed(f: Callable[[], np.ndarray], pauses: Pauses) -> tuple[float, np.ndarray, float]:
    """(seconds run, output, seconds stopped): wall time less the stops, where SIGCONT says there were some."""
    resumes, stopped = pauses.resumes, pauses.stopped
    t0 = time.perf_counter()
    out = f()
    seconds = time.perf_counter() - t0
    if pauses.resumes == resumes:
        return seconds, out, 0.0
    time.sleep(0.1)  # the ticker's first tick after the resume records the gap
    lost = min(pauses.stopped - stopped, seconds)
    return seconds - lost, out, lost


def run(repeats: int, threads: int, n_texts: int, batch: int, tokenizer_dir: Path, engines: list[str],
        on_repeat: Callable[[dict], None] | None = None) -> dict:
    """The result after all repeats; on_repeat gets the result so far after each (a shared machine may not leave
    time for all of them, and what was measured is kept)."""
    from sentence_transformers import SentenceTransformer

    from ..embed import load_embedding_model
    from ..embed.export import write_gemma_embedding_gguf

    torch.set_num_threads(threads)
    data = texts(n_texts)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "eg", tokenizer_dir)
        ours = {"gemmakit": load_embedding_model(folder)}
        if "gemmakit-bf16" in engines:
            ours["gemmakit-bf16"] = load_embedding_model(folder, dtype="bfloat16")
        n_tokens = sum(len(ours["gemmakit"].tokenize(t)) for t in data)
        fns: dict[str, Callable[[], np.ndarray]] = {
            k: (lambda m=m: m.embed(data, batch_size=batch)) for k, m in ours.items()}
        if "sentence-transformers" in engines:
            st = SentenceTransformer(str(folder), device="cpu")
            fns["sentence-transformers"] = lambda: st.encode(data, batch_size=batch, convert_to_numpy=True)
        if "llama.cpp" in engines:
            import llama_cpp

            gguf = write_gemma_embedding_gguf(folder, Path(tmp) / "eg.gguf")
            # 8 sequences of up to 512 tokens per batch (each sequence gets n_ctx / n_seq_max of the context)
            llm = llama_cpp.Llama(str(gguf), embedding=True, n_ctx=4096, n_batch=4096, n_ubatch=4096,
                                  n_seq_max=8, n_threads=threads, n_threads_batch=threads, verbose=False,
                                  pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
            fns["llama.cpp"] = lambda: np.array(llm.embed(data, normalize=True), dtype=np.float32)
        warm = data[:4]  # warm-up on a few texts (a full extra pass would cost minutes per engine)
        for m in ours.values():
            m.embed(warm, batch_size=batch)
        if "sentence-transformers" in fns:
            st.encode(warm, batch_size=batch)
        if "llama.cpp" in fns:
            llm.embed(warm)
        load_before = os.getloadavg()
        pauses = Pauses()
        outputs: dict[str, np.ndarray] = {}  # from the first timed repeat, compared below
        times: dict[str, list[float]] = {k: [] for k in fns}
        stopped = dict.fromkeys(fns, 0.0)
        for done in range(1, repeats + 1):
            for k, f in fns.items():
                seconds, out, lost = timed(f, pauses)
                outputs.setdefault(k, out)
                times[k].append(seconds)
                stopped[k] += lost
            result = summarize(times, outputs, stopped, n_texts, n_tokens)
            result.update(threads=threads, batch_size=batch, repeats=done, load_average_before=load_before,
                          load_average_after=os.getloadavg())
            if on_repeat is not None:
                on_repeat(result)
    return result


def summarize(times: dict[str, list[float]], outputs: dict[str, np.ndarray], stopped: dict[str, float],
              n_texts: int, n_tokens: int) -> dict:
    """Medians, rates, ratios to gemmakit fp32 and bf16, and each engine's cosine to gemmakit fp32."""
    ref = outputs["gemmakit"]
    result = {"machine": machine(), "isa": isa(), "texts": n_texts, "tokens": n_tokens, "shape": SHAPE,
              "peak_rss_mb": round(peak_rss_mb()), "engines": {}}
    for k, ts in times.items():
        med = statistics.median(ts)
        cos = float(((outputs[k] * ref).sum(1) / np.linalg.norm(outputs[k], axis=1)).min())
        result["engines"][k] = {"dtype": DTYPES[k], "seconds": ts, "seconds_stopped_subtracted": stopped[k],
                                "texts_per_s": n_texts / med,
                                "tokens_per_s": n_tokens / med, "min_cosine_vs_gemmakit": cos}
    for ours_name in ("gemmakit", "gemmakit-bf16"):
        if ours_name in result["engines"]:
            base = result["engines"][ours_name]["texts_per_s"]
            for r in result["engines"].values():
                r[f"{ours_name}_speedup"] = base / r["texts_per_s"]
    return result


def store(n: int = 100_000, dim: int = 768, repeats: int = 5) -> dict:
    """The numpy vector store of `ask` (recipes/vectors.py) at n passages: memory-mapped load and exact top-10."""
    from ..recipes.vectors import top

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = rng.standard_normal((repeats, dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matrix.npy"
        np.save(path, matrix)
        del matrix
        loads, firsts, searches, reads = [], [], [], []
        for q in queries:
            t0 = time.perf_counter()
            m = np.load(path, mmap_mode="r")
            t1 = time.perf_counter()
            top(m, q, 10)
            t2 = time.perf_counter()
            top(m, q, 10)
            t3 = time.perf_counter()
            np.load(path)
            t4 = time.perf_counter()
            loads.append(t1 - t0)
            firsts.append(t2 - t1)
            searches.append(t3 - t2)
            reads.append(t4 - t3)
    med = statistics.median
    return {"passages": n, "dim": dim, "bytes": n * dim * 4, "mmap_load_s": med(loads),
            "first_query_s": med(firsts), "warm_query_s": med(searches), "full_read_s": med(reads),
            "machine": machine(), "threads": torch.get_num_threads()}


def table(result: dict) -> str:
    bf16 = "gemmakit-bf16" in result["engines"]
    rows = ["| engine | dtype | texts/s | tokens/s | gemmakit fp32 x |" + (" gemmakit bf16 x |" if bf16 else "")
            + " min cosine vs gemmakit fp32 |", "|---|---|---|---|---|---|" + ("---|" if bf16 else "")]
    for k, r in result["engines"].items():
        rows.append(f"| {k} | {r['dtype']} | {r['texts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                    f"{r['gemmakit_speedup']:.2f} |" + (f" {r['gemmakit-bf16_speedup']:.2f} |" if bf16 else "")
                    + f" {r['min_cosine_vs_gemmakit']:.6f} |")
    stops = ", ".join(f"{k} {r['seconds_stopped_subtracted']:.0f} s" for k, r in result["engines"].items()
                      if r["seconds_stopped_subtracted"])
    load = " / ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (result["load_average_before"],
                                                                    result["load_average_after"]))
    return (f"# Embeddings/s, EmbeddingGemma-300m shape (random weights)\n\n{result['machine']}; "
            f"{result['threads']} threads; {result['texts']} texts, {result['tokens']} tokens, batch "
            f"{result['batch_size']}; median of {result['repeats']} alternating runs; peak RSS "
            f"{result['peak_rss_mb']} MB; load average (1, 5, 15 min) before / after the timed runs: {load}; time "
            f"the process spent stopped (SIGSTOP by another benchmark) taken out of the runs: {stops or 'none'}.\n\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokenizer", type=Path, help="folder with the Gemma 3 tokenizer.json")
    ap.add_argument("--store", action="store_true", help="instead: the vector store at 100,000 passages")
    ap.add_argument("--engines", default="gemmakit,sentence-transformers,llama.cpp")
    ap.add_argument("--name", default=None)
    ap.add_argument("--note", default="", help="a line for the results, e.g. that the machine was shared")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.store:
        r = store()
        md = (f"# ask's vector store: numpy, {r['passages']} x {r['dim']} float32 ({r['bytes'] / 2**20:.0f} MiB)\n\n"
              f"{r['machine']}; median of 5.\n\n| step | seconds |\n|---|---|\n"
              f"| np.load(mmap_mode='r') | {r['mmap_load_s']:.4f} |\n| first exact top-10 (pages read in) | "
              f"{r['first_query_s']:.4f} |\n| warm exact top-10 | {r['warm_query_s']:.4f} |\n"
              f"| np.load (full read, for comparison) | {r['full_read_s']:.4f} |\n" + (f"\n{args.note}\n" if args.note else ""))
        r["note"] = args.note
        print(md)
        print(write_results(args.out, args.name, r, md, kind="vector-store"))
        return

    def save(result: dict) -> None:
        result["note"] = args.note
        md = table(result) + (f"\n{args.note}\n" if args.note else "")
        print(md, flush=True)
        print(write_results(args.out, args.name, result, md, kind="embeddings"), flush=True)

    run(args.repeats, args.threads, args.texts, args.batch, args.tokenizer, args.engines.split(","), save)


if __name__ == "__main__":
    main()
