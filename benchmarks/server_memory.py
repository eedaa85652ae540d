"""Memory of one teacher-server scoring call at a real vocabulary: the transformers backend's chunked LM head, with and
without the fixed glibc mmap threshold that `protege serve-teacher` sets.

One case per process (glibc's setting is process-wide), on a model folder such as the real-shape teacher that
`benchmarks/real_scale.py` builds:

    python benchmarks/server_memory.py --model /tmp/protege_real_scale/real/teacher --tokens 2000
    python benchmarks/server_memory.py --model /tmp/protege_real_scale/real/teacher --tokens 2000 --glibc-default

It reads every weight first (they are memory-mapped), then scores 2 random sequences of `--tokens` tokens (16 prompt
tokens each, top-1, temperature 1) in one `TransformersBackend.score` call, and prints the growth of `ru_maxrss`.
"""

from __future__ import annotations

import argparse
import random
import resource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher model folder")
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per sequence (2 sequences)")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold alone")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from protege.server.backends import TransformersBackend, return_large_blocks_to_the_os

    torch.set_num_threads(args.threads)
    fixed = False if args.glibc_default else return_large_blocks_to_the_os()
    backend = TransformersBackend(args.model)
    with torch.inference_mode():
        for tensor in backend.model.state_dict().values():
            tensor.sum()
    rng = random.Random(0)
    sequences = [[rng.randrange(5, backend.vocab_size) for _ in range(args.tokens)] for _ in range(2)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backend.score(sequences, [16, 16], 1, 1.0)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    print(f"tokens 2 x {args.tokens}, vocabulary {backend.vocab_size}, fixed mmap threshold {fixed}: +{growth_mib} MiB")


if __name__ == "__main__":
    main()
