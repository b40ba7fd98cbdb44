"""DECA's networks: backbones, coarse/detail encoders, detail decoder."""
from recon.networks.backbones import FEATURE_DIMS, Backbone
from recon.networks.detail_decoder import DetailDecoder
from recon.networks.encoders import CodeLayout, CoarseEncoder, Encoder
from recon.networks.keypoints import KeypointCoarseEncoder

__all__ = ["FEATURE_DIMS", "Backbone", "CodeLayout", "CoarseEncoder", "DetailDecoder", "Encoder",
           "KeypointCoarseEncoder"]
