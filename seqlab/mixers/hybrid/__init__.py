"""Hybrid mixers: softmax attention over a window plus a linear state for the rest (LoLCATs, Liger)."""
