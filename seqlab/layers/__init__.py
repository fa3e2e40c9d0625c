"""Building blocks shared by the token mixers (and usable by new ones):

    norms         RMSNorm (per head, optionally swish-gated), srms_norm (SimpleRMSNorm), l2_normalize,
                  plain_layer_norm (no weight or bias)
    conv          ShortConv, the depthwise causal short convolution; head_shared_conv (one conv for every head)
    grid_conv     CentredConv, the centred depthwise convolution over 1-D tokens or a 2-D grid (RALA, LiT)
    positional    positions (absolute positions of a call's tokens), RoPE, rotate_pairs
    lrpe          URPE (TransNormer), LRPE (TransNormerLLM)
    md_lrpe       MD-LRPE (LightNet): md_lrpe, grid_positions
    feature_maps  linear-attention feature maps: identity, elu1, relu, taylor, hedgehog (make_feature_map)
    global_means  the global means of non-causal layers (InLine, SLAB, LinFusion, RALA, LiT), normalized_readout
    ssm           Mamba2's decay parameterisation (init_mamba_decay, mamba_decay)
    heads         repeat_kv_columns (grouped key/value heads repeated per query head)
"""

from seqlab.layers.conv import ShortConv
from seqlab.layers.feature_maps import FeatureMap, make_feature_map
from seqlab.layers.global_means import GlobalMeans, global_means
from seqlab.layers.heads import repeat_kv_columns
from seqlab.layers.lrpe import LRPE, URPE
from seqlab.layers.md_lrpe import grid_positions, md_lrpe
from seqlab.layers.norms import RMSNorm, l2_normalize, plain_layer_norm, srms_norm
from seqlab.layers.positional import RoPE, positions, rotate_pairs
from seqlab.layers.ssm import init_mamba_decay, mamba_decay
