"""Prints the model presets: ``python -m models [--seq-len 256]``."""

import argparse

from models import llama


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seq-len", type=int, default=256)
  args = parser.parse_args()
  print(f"| preset | d | ffn | heads | kv heads | layers | max pos | params | "
        f"train FLOPs/token (seq {args.seq_len}) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, c in llama.CONFIGS.items():
    print(f"| {name} | {c.hidden_size} | {c.intermediate_size} | {c.num_heads} | "
          f"{c.num_kv_heads} | {c.num_layers} | {c.max_position_embeddings} | "
          f"{c.num_params():,} | {c.flops_per_token(args.seq_len):.3e} |")


if __name__ == "__main__":
  main()
