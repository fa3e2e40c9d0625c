"""Convolutional mixers: BaseConv, VAN large kernel attention, ULSAM subspace attention, HyperZ·Z·W."""
