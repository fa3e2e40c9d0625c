"""Convolutional mixers (BaseConv)."""
