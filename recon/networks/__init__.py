"""DECA's networks: backbones, coarse/detail encoders, detail decoder."""
from recon.networks.backbones import FEATURE_DIMS, Backbone
from recon.networks.detail_decoder import DecaDetailDecoder, DetailDecoder
from recon.networks.encoders import (CodeLayout, CoarseEncoder, DecaCoarseEncoder, DecaEncoder,
                                     Encoder)
from recon.networks.keypoints import KeypointCoarseEncoder

__all__ = ["FEATURE_DIMS", "Backbone", "CodeLayout", "CoarseEncoder", "DecaCoarseEncoder",
           "DecaDetailDecoder", "DecaEncoder", "DetailDecoder", "Encoder", "KeypointCoarseEncoder"]
