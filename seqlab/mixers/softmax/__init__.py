"""Softmax-attention mixers: full causal attention and sliding windows (RoPE, GQA)."""
