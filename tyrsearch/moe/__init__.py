"""Mixture-of-Experts models: MoEfication of dense decoders (`moefy`)."""

from tyrsearch.moe.moefy import MoefyConfig, active_params, check_counts, check_moefiable, moefy, save_moe

__all__ = ["MoefyConfig", "active_params", "check_counts", "check_moefiable", "moefy", "save_moe"]
