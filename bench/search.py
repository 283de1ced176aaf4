"""Search latency (p50/p99) and recall@10 of a collection's FAISS indexes: exact (flat) vs ANN (IVF).

Synthetic clustered unit vectors (default 1M x 512-d, the issue's size), single-query searches as a
collection serves them, built and queried with `clipserve.collections.index` (the code `Collection`
uses). Bounded on 2 cores: IVF trains on a sample, exact search is timed on `--exact-queries` queries only.

    .venv/bin/python bench/search.py --n 1000000          # the full size
    .venv/bin/python bench/search.py --n 200000 --threads 2
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from clipserve.collections import index as faiss_index


def clustered(n: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):  # in chunks: the noise of 1M x 512 would double peak memory
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, clusters, stop - start)]
        out[start:stop] += 0.6 * rng.normal(size=(stop - start, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def timed_search(index: faiss.Index, params: faiss.SearchParameters, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k], per-query latency in ms)."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    latency = np.empty(len(queries))
    for i, q in enumerate(queries):
        start = time.perf_counter()
        _, ids[i : i + 1] = index.search(q[None], k, params=params)
        latency[i] = (time.perf_counter() - start) * 1000
    return ids, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--exact-queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    t = time.perf_counter()
    data = clustered(args.n + args.queries, args.dim, args.clusters, rng)
    vectors, queries = data[: args.n], data[args.n :]
    ids = np.arange(1, args.n + 1, dtype=np.int64)
    print(f"{args.n} x {args.dim}-d vectors, {args.queries} queries, k={args.k}, {args.threads} threads "
          f"(data in {time.perf_counter() - t:.1f}s)")  # fmt: skip

    t = time.perf_counter()
    exact, exact_state = faiss_index.build("flat", vectors, ids)
    print(f"flat: built in {time.perf_counter() - t:.1f}s")
    _, exact_ms = timed_search(exact, faiss_index.search_params(exact_state), queries[: args.exact_queries], args.k)
    # Ground truth for every query in one batched call (much faster than one by one).
    _, truth = exact.search(queries, args.k)
    del exact

    t = time.perf_counter()
    ann, state = faiss_index.build("ivf", vectors, ids)
    print(f"ivf: built in {time.perf_counter() - t:.1f}s (nlist={state.nlist}, nprobe={state.nprobe})")
    found, ann_ms = timed_search(ann, faiss_index.search_params(state), queries, args.k)
    recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(truth, found, strict=True)])

    print(f"{'index':6} {'p50 ms':>8} {'p99 ms':>8} {'recall@' + str(args.k):>10}")
    print(f"{'flat':6} {np.percentile(exact_ms, 50):8.2f} {np.percentile(exact_ms, 99):8.2f} {1.0:10.3f}")
    print(f"{'ivf':6} {np.percentile(ann_ms, 50):8.2f} {np.percentile(ann_ms, 99):8.2f} {recall:10.3f}")


if __name__ == "__main__":
    main()
